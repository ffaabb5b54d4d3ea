"""Small image helpers shared by stages: array/PIL conversion, sample grids (contact sheets), and the
sampled images' [-1, 1] floats as uint8.

No torch import here (the helpers that take tensors use only their methods); a tensor image can be
passed to the array helpers after ``.permute(1, 2, 0).cpu().numpy()`` (HWC).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

ImageLike = Union[np.ndarray, Image.Image]


def to_uint8(images: "torch.Tensor") -> "torch.Tensor":
    """[-1, 1] floats -> uint8 [0, 255], rounded."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte()


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image in mode L or RGB (RGBA kept) from a PIL image or an array.

    Arrays: HxW, HxWx1, HxWx3 or HxWx4; uint8 as is, floats are taken as [0, 1] and clipped."""
    if isinstance(image, Image.Image):
        if image.mode in ("L", "RGB", "RGBA"):
            return image
        return image.convert("RGBA" if "A" in image.getbands() else "RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        else:
            array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(array, "RGB" if array.shape[2] == 3 else "RGBA")
    raise ValueError(f"expected an HxW or HxWxC (C in 1, 3, 4) image array, got shape {array.shape}")


def image_grid(images: Iterable[ImageLike], nrow: int = 8, padding: int = 2,
               pad_value: int = 0) -> Image.Image:
    """Tile images into a grid of ``nrow`` columns, row by row (like torchvision's ``make_grid``).

    Images may differ in size and mode: each is centered in a cell of the largest size, and the
    grid is RGB if any image has colour, else L. Alpha is flattened onto ``pad_value``."""
    pils = [to_pil(image) for image in images]
    if not pils:
        raise ValueError("image_grid needs at least one image")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    mode = "L" if all(p.mode == "L" for p in pils) else "RGB"
    cell_w = max(p.width for p in pils)
    cell_h = max(p.height for p in pils)
    cols = min(nrow, len(pils))
    rows = math.ceil(len(pils) / nrow)
    fill = pad_value if mode == "L" else (pad_value,) * 3
    grid = Image.new(mode, (cols * cell_w + (cols + 1) * padding, rows * cell_h + (rows + 1) * padding), fill)
    for index, pil in enumerate(pils):
        if pil.mode == "RGBA":
            background = Image.new("RGBA", pil.size, (pad_value,) * 3 + (255,))
            pil = Image.alpha_composite(background, pil)
        pil = pil.convert(mode)
        row, col = divmod(index, nrow)
        x = padding + col * (cell_w + padding) + (cell_w - pil.width) // 2
        y = padding + row * (cell_h + padding) + (cell_h - pil.height) // 2
        grid.paste(pil, (x, y))
    return grid


def class_grid(images: "torch.Tensor", labels: Sequence[int], per_label: int) -> Image.Image:
    """A grid of uint8 (N, C, H, W) images with one row per distinct label (in order of first appearance)
    and ``per_label`` columns: the first ``per_label`` images of that label; missing cells stay black."""
    labels = [int(label) for label in labels]
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not labels:
        raise ValueError("class_grid needs at least one image")
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    blank = np.zeros_like(arrays[0])
    cells = []
    for label in dict.fromkeys(labels):
        mine = [arrays[i] for i, other in enumerate(labels) if other == label][:per_label]
        cells += mine + [blank] * (per_label - len(mine))
    return image_grid(cells, nrow=per_label)
