"""Reading the latents step's output: what the DiT step (and anything else) trains on.

A latent shard ``train/latents-XXXXX.tar`` (or ``val/…``) holds per sample ``<key>.latent.npy``
(``np.save`` bytes, (c, h, w), already multiplied by the autoencoder's scale factor) and
``<key>.cls`` when the source is labelled. ``manifest.info`` lists ``train_shards``/``val_shards``,
their per-shard ``train_counts``/``val_counts``, ``latent_shape``, ``scale_factor``, ``classes``
and ``counts``. Training streams them (``components.common.task_parts.latent_source``); this
module reads a bounded number of them into memory (validation, grids, tests).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import torch

from components.common.data import LABEL_KEY, LATENT_KEY, parse_label
from components.common.shard_reader import iter_shard_samples

if TYPE_CHECKING:
    from components.common.step import Manifest

__all__ = ["LABEL_KEY", "LATENT_KEY", "decode_latent", "load_latent_shards"]


def decode_latent(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def load_latent_shards(manifest: "Manifest", split: str = "train",
                       limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents float32 (N, c, h, w), labels int64 (N,), -1 where unlabelled) of one split in
    memory, shards in manifest order, the first ``limit`` only when given (later shards are then
    not read); local or S3 (downloaded through ``manifest.storage()``)."""
    rels = manifest.info[f"{split}_shards"]
    latents, labels = [], []
    for sample in iter_shard_samples(manifest.storage(), rels, (LATENT_KEY, LABEL_KEY)):
        if limit is not None and len(latents) >= limit:
            break
        latents.append(decode_latent(sample[LATENT_KEY]))
        labels.append(parse_label(sample.get(LABEL_KEY), sample["__key__"]))
    if not latents:
        shape = manifest.info.get("latent_shape", [0, 0, 0])
        return torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.stack(latents).astype(np.float32)), torch.tensor(labels, dtype=torch.int64)
