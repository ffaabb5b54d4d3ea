"""Reading the latents step's output: what the DiT step (and anything else) trains on.

A latent shard ``train/latents-XXXXX.tar`` (or ``val/…``) holds per sample ``<key>.latent.npy``
(``np.save`` bytes, (c, h, w), already multiplied by the autoencoder's scale factor) and
``<key>.cls`` when the source is labelled. ``manifest.info`` lists ``train_shards``/``val_shards``,
``latent_shape``, ``scale_factor``, ``classes`` and ``counts``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from components.common.shard_reader import iter_shard_samples, parse_label, rank_batch_indices

if TYPE_CHECKING:
    from components.common.step import Manifest

LATENT_KEY = "latent.npy"
LABEL_KEY = "cls"


def decode_latent(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def load_latent_shards(manifest: "Manifest", split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(latents float32 (N, c, h, w), labels int64 (N,), -1 where unlabelled) of one split, all in
    memory, shards in manifest order; local or S3 (downloaded through ``manifest.storage()``)."""
    rels = manifest.info[f"{split}_shards"]
    latents, labels = [], []
    for sample in iter_shard_samples(manifest.storage(), rels, (LATENT_KEY, LABEL_KEY)):
        latents.append(decode_latent(sample[LATENT_KEY]))
        labels.append(parse_label(sample.get(LABEL_KEY), sample["__key__"]))
    if not latents:
        shape = manifest.info.get("latent_shape", [0, 0, 0])
        return torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.stack(latents).astype(np.float32)), torch.tensor(labels, dtype=torch.int64)


def latent_batches(latents: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, epoch: int,
                   rank: int, world_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of this rank's batches ``{"latent": (B, c, h, w), "label": (B,)}``: a permutation
    seeded by (seed, epoch), split round-robin between ranks, full batches only, so every rank gets
    the same count. Plain function of tensors: call it from a TrainTask's ``batches``."""
    for index in rank_batch_indices(len(latents), batch_size, seed, epoch, rank, world_size):
        index = torch.from_numpy(index)
        yield {"latent": latents[index], "label": labels[index]}
