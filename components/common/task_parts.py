"""Pieces shared by the diffusion training tasks (the DiT, the super-resolution stages): the
training split of a shard step in memory, and the export of EMA and online weights with a meta file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from components.common.step import Manifest


def train_split_in_memory(shard: "Manifest", size: int | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(uint8 images (N, C, H, W), int64 labels (N,)) of the shard step's training split, resized
    to ``size`` when given."""
    import torch

    from components.common.shard_reader import read_image_shards

    info = shard.info
    images, labels, _ = read_image_shards(shard.storage(), info["train_shards"], info.get("image_format", "png"),
                                          size=size)
    return torch.from_numpy(images), torch.from_numpy(labels)


def export_weights(model: "torch.nn.Module", ema_model: "torch.nn.Module", out_dir: Path, ema_name: str,
                   online_name: str, meta_name: str, meta: dict[str, Any]) -> None:
    """``ema_name`` (what sampling loads), ``online_name`` and ``meta_name`` (JSON) into ``out_dir``."""
    from safetensors.torch import save_file

    def weights(m):
        return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}

    save_file(weights(ema_model), str(out_dir / ema_name), metadata={"weights": "ema"})
    save_file(weights(model), str(out_dir / online_name), metadata={"weights": "online"})
    (out_dir / meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True))


def image_batches(images: "torch.Tensor", labels: "torch.Tensor", train, epoch: int, rank: int, world_size: int,
                  transform=None):
    """This rank's ``{"image", "label"}`` batches of one epoch (``rank_batch_indices``); ``train``
    is the step's ``TrainConfig``; ``transform`` maps each uint8 image batch (e.g. to [-1, 1])."""
    import torch

    from components.common.shard_reader import rank_batch_indices

    for index in rank_batch_indices(len(images), train.batch_size, train.seed, epoch, rank, world_size):
        index = torch.from_numpy(index)
        batch = images[index]
        yield {"image": transform(batch) if transform else batch, "label": labels[index]}
