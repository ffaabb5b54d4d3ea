"""Pieces shared by the training tasks: where a worker's batches come from (the shard step's images or
the latents step's latents, streamed; or tensors in memory for tests and benchmarks), and the
export of EMA and online weights with a meta file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from components.common.step import Manifest
    from components.common.stream import BatchSource
    from components.common.train_types import TrainConfig


def image_source(shard: "Manifest | None", in_memory: "tuple[torch.Tensor, torch.Tensor] | None",
                 train: "TrainConfig", rank: int, world_size: int, micro_batch: int, size: int | None = None,
                 filter: str = "bicubic", transform: Callable[[dict], dict] | None = None) -> "BatchSource":
    """``{"image": uint8 (B, C, size, size), "label": int64 (B,)}`` batches (then ``transform``) of the
    shard step's training split, streamed; or of ``in_memory`` (images, labels) when given."""
    from components.common.data import ImageDecoder, image_split
    from components.common.stream import ShardSource, TensorSource

    if in_memory is not None:
        from components.common.resample import resize_uint8

        images, labels = in_memory
        images = resize_uint8(images, size, filter) if size is not None else images
        return TensorSource({"image": images, "label": labels}, micro_batch, train.seed, rank, world_size,
                            train.loader.shuffle_window, transform)
    decoder = ImageDecoder(shard.info.get("image_format", "png"), size, filter)
    return ShardSource(image_split(shard, "train"), decoder, micro_batch, train.seed, rank, world_size, train.loader,
                       transform)


def latent_source(latents: "Manifest | None", in_memory: "tuple | None", train: "TrainConfig", rank: int,
                  world_size: int, micro_batch: int, captions: bool = False, embeddings: bool = False) -> "BatchSource":
    """``{"latent": float32 (B, c, h, w), "label": int64 (B,)}`` batches of the latents step's
    training split, streamed, with ``"caption"`` (a list of str) when ``captions`` and the stored text
    embeddings ``"context"`` (B, L, D) (padded), ``"context_mask"``, ``"pooled"`` when ``embeddings``; or
    of ``in_memory`` (latents, labels[, captions]) when given."""
    from components.common.data import LatentDecoder, latent_split
    from components.common.stream import ShardSource, TensorSource

    if in_memory is not None:
        columns = dict(zip(("latent", "label", "caption"), in_memory))
        if captions and "caption" not in columns:
            raise ValueError("text conditioning needs captions: in_memory is (latents, labels, captions)")
        return TensorSource(columns, micro_batch, train.seed, rank, world_size, train.loader.shuffle_window)
    return ShardSource(latent_split(latents, "train", captions=captions, embeddings=embeddings),
                       LatentDecoder(captions=captions, embeddings=embeddings),
                       micro_batch, train.seed, rank, world_size, train.loader)


class ConvertImages:
    """A batch transform: ``convert`` (e.g. uint8 -> the model's range) applied to the ``image``
    column. A class, not a closure, so that it pickles: it travels to the workers inside the task."""

    def __init__(self, convert: Callable[["torch.Tensor"], "torch.Tensor"]):
        self.convert = convert

    def __call__(self, batch: dict) -> dict:
        return {**batch, "image": self.convert(batch["image"])}


def export_weights(model: "torch.nn.Module", ema_model: "torch.nn.Module", out_dir: Path, ema_name: str,
                   online_name: str, meta_name: str, meta: dict[str, Any]) -> None:
    """``ema_name`` (what sampling loads), ``online_name`` and ``meta_name`` (JSON) into ``out_dir``."""
    from safetensors.torch import save_file

    def weights(m):
        return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}

    save_file(weights(ema_model), str(out_dir / ema_name), metadata={"weights": "ema"})
    save_file(weights(model), str(out_dir / online_name), metadata={"weights": "online"})
    (out_dir / meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True))
