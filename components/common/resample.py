"""The one image resampling of the pipeline: SR training pairs, a base resolution below the shard
size, and evaluation at a stage's size all go through it, so every stage sees at sampling time the
kind of image it was trained on."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FILTERS = ("bicubic", "bilinear", "area", "nearest")


def resize(images: torch.Tensor, size: int, filter: str = "bicubic") -> torch.Tensor:
    """Float images (N, C, H, W) in [-1, 1] to (N, C, size, size). Downsampling is antialiased
    (bicubic/bilinear) or a box average (area); values are clamped back into [-1, 1]."""
    if filter not in FILTERS:
        raise ValueError(f"unknown resampling filter {filter!r}; valid: {', '.join(FILTERS)}")
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if filter == "area" and size > images.shape[-1]:
        filter = "bilinear"  # area only averages: upsample bilinearly instead
    kwargs = {"align_corners": False, "antialias": True} if filter in ("bicubic", "bilinear") else {}
    return F.interpolate(images.float(), size=(size, size), mode=filter, **kwargs).clamp(-1, 1)


def resize_uint8(images: np.ndarray | torch.Tensor, size: int, filter: str = "bicubic",
                 chunk: int = 512) -> np.ndarray | torch.Tensor:
    """uint8 (N, C, H, W) images resized through ``resize``, in chunks; same type out as in."""
    as_numpy = isinstance(images, np.ndarray)
    tensor = torch.from_numpy(images) if as_numpy else images
    if tensor.shape[-1] == size and tensor.shape[-2] == size:
        return images
    parts = []
    for start in range(0, len(tensor), chunk):
        x = resize(tensor[start:start + chunk].float().div(127.5).sub(1.0), size, filter)
        parts.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    out = torch.cat(parts) if parts else tensor[:, :, :size, :size].clone()
    return out.numpy() if as_numpy else out
