"""Control signals, made from each training image in the data stream (nothing precomputed over the set).

- ``edges``: the Sobel gradient magnitude of the grey image in [0, 1], each axis' response divided
  by 4 (its largest value on a 0 -> 1 step), thresholded at ``edge_threshold``: white edges on black;
- ``blur``: a Gaussian blur of ``blur_sigma`` pixels;
- ``low_res``: down to ``low_res_size`` pixels a side (antialiased), then back up (bicubic);
- ``folder``: the user's own control image ``<folder>/<sample key>.<png|jpg|jpeg|webp>``, read
  with the sample by ``ControlDecoder`` (paired by key; a sample without one is a bad sample).

Every signal is an image of the training image's shape (channels, size), uint8, so that it goes
through the autoencoder exactly as the image does (``ControlNetTask.latents``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from components.common.data import IMAGE_KEYS, ImageDecoder, decode_image
from components.common.sample_reader import ShardDataError

if TYPE_CHECKING:
    from components.controlnet.config import ControlNetConfig

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, 1, H, W): |gradient| of the grey image in [0, 1], each axis /4."""
    grey = images.float().mean(dim=1, keepdim=True) / 255.0  # (N, 1, H, W)
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.t()])[:, None] / 4.0  # (2, 1, 3, 3)
    gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)  # (N, 2, H, W)
    return gradients.pow(2).sum(dim=1, keepdim=True).sqrt()  # (N, 1, H, W)


def edge_map(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, H, W): 255 where the Sobel magnitude exceeds ``threshold``."""
    edges = (sobel_magnitude(images) > threshold).to(torch.uint8) * 255  # (N, 1, H, W)
    return edges.expand(-1, images.shape[1], -1, -1).contiguous()


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from components.superres.augment import gaussian_blur

    # the kernel covers 3 sigma each side, but reflect padding needs it narrower than the image
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(images.shape[-2:]) - 1) // 2) + 1)
    x = gaussian_blur(images.float(), torch.full((len(images),), float(sigma)), kernel)
    return x.round().clamp(0, 255).to(torch.uint8)


def low_resolution(images: torch.Tensor, size: int) -> torch.Tensor:
    from components.common.resample import resize_uint8

    return resize_uint8(resize_uint8(images, size, "bicubic"), images.shape[-1], "bicubic")


def control_signal(images: torch.Tensor, cfg: "ControlNetConfig") -> torch.Tensor:
    """The configured computed signal of uint8 (N, C, H, W) images, uint8 of the same shape."""
    if cfg.control == "edges":
        return edge_map(images, cfg.edge_threshold)
    if cfg.control == "blur":
        return blurred(images, cfg.blur_sigma)
    if cfg.control == "low_res":
        return low_resolution(images, cfg.low_res_size)
    raise ValueError(f"control {cfg.control!r} is not computed from the image (folder is read by ControlDecoder)")


class ControlMaker:
    """The stream's batch transform: uint8 images (and a folder's controls) -> ``image`` and ``control``
    float32 in [-1, 1], ``label``. A class, so that it pickles to the workers inside the task."""

    def __init__(self, cfg: "ControlNetConfig"):
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        from components.autoencoder.load import to_model_range

        images = batch["image"]
        control = batch["control"] if "control" in batch else control_signal(images, self.cfg)
        return {"image": to_model_range(images), "control": to_model_range(control), "label": batch["label"]}


def find_control_file(folder: str | Path, key: str) -> Path | None:
    for ext in IMAGE_KEYS:
        path = Path(folder) / f"{key}.{ext}"
        if path.is_file():
            return path
    return None


class ControlDecoder(ImageDecoder):
    """``control: folder``: the sample's image and its control ``<folder>/<key>.<ext>``, both uint8 at the
    image's size and channels (a control of another shape is resized, its channels converted)."""

    def __init__(self, folder: str, image_key: str = "png", size: int | None = None):
        super().__init__(image_key, size)
        self.folder = folder

    def __call__(self, key: str, data: dict[str, bytes]) -> dict[str, np.ndarray]:
        decoded = super().__call__(key, data)
        return {**decoded, "control": self.control_of(key, decoded["image"])}

    def control_of(self, key: str, image: np.ndarray) -> np.ndarray:
        """The control of sample ``key`` as uint8 of ``image``'s shape (C, H, W)."""
        from components.common.resample import resize_uint8

        path = find_control_file(self.folder, key)
        if path is None:
            raise ShardDataError(f"sample {key!r}: no control image {key}.<{'|'.join(IMAGE_KEYS)}> in {self.folder}")
        control = decode_image(path.read_bytes(), str(path))
        channels, size = image.shape[0], image.shape[-1]
        if control.shape[0] != channels:
            control = np.repeat(control, channels, axis=0) if control.shape[0] == 1 else \
                control.mean(axis=0, keepdims=True).round().astype(np.uint8)
        if control.shape[-1] != size or control.shape[-2] != size:
            control = resize_uint8(control[None], size)[0]
        return control
