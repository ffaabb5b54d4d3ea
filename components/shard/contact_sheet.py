"""The shard step's contact sheet: an 8x8 grid of samples drawn at random, reproducibly.

"Random" is a seeded hash of the sample key: each Ray task keeps its 64 valid samples of lowest
priority and the step keeps the lowest 64 overall, so the choice depends only on the seed and the
keys, never on how the work was split, and it never lands on a skipped file.
"""

from __future__ import annotations

import bisect
import hashlib

import numpy as np
from PIL import Image

from components.common.images import image_grid

GRID = 8
SHEET_SAMPLES = GRID * GRID
TILE_MAX = 128  # tiles are shrunk to at most this size so the sheet stays small at any resolution


def priority(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def tile(image: Image.Image) -> np.ndarray:
    if max(image.size) > TILE_MAX:
        image = image.copy()
        image.thumbnail((TILE_MAX, TILE_MAX), Image.Resampling.BICUBIC)
    return np.asarray(image)


class SheetPicker:
    """Keeps the ``size`` candidates of lowest priority among those offered."""

    def __init__(self, seed: int, size: int = SHEET_SAMPLES):
        self.seed, self.size = seed, size
        self.kept: list[tuple[str, str, np.ndarray]] = []  # sorted by (priority, key)

    def offer(self, key: str, image: Image.Image) -> None:
        rank = priority(self.seed, key)
        if len(self.kept) == self.size and (rank, key) >= self.kept[-1][:2]:
            return
        bisect.insort(self.kept, (rank, key, tile(image)), key=lambda entry: entry[:2])
        del self.kept[self.size:]

    def picked(self) -> list[tuple[str, str, np.ndarray]]:
        """(priority, key, tile), lowest priority first."""
        return list(self.kept)


def merge(candidates: list[tuple[str, str, np.ndarray]], size: int = SHEET_SAMPLES) -> list[np.ndarray]:
    """The tiles of the ``size`` lowest-priority candidates, in priority order."""
    return [array for _, _, array in sorted(candidates, key=lambda c: (c[0], c[1]))[:size]]


def contact_sheet(tiles: list[np.ndarray]) -> Image.Image:
    return image_grid(tiles, nrow=GRID, padding=2, pad_value=0)
