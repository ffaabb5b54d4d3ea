"""Which samples a training worker reads in one epoch, in which order: pure arithmetic on the
shards' sample counts, so that a position in the epoch is one integer and a resumed worker can
start exactly there without reading anything before it.

For (seed, epoch), the shards are put in a seeded random order and their samples laid end to end:
N positions. Rank r of W owns the contiguous span [r·L, (r+1)·L) of them, L = N // W (the last
N mod W are left out of this epoch; a new shard order leaves out others next epoch). A rank reads
its span in windows of ``window`` samples; each window is a seeded permutation of its positions, a
block shuffle in the manner of MosaicML Streaming's ``py1b``. So

- a rank touches about 1/W of the shards (its span), never every shard;
- samples are mixed within a window (across the shards it covers) and across epochs (shard order);
  the shard step also writes its samples shuffled, so a window is already a random draw;
- memory is one window's permutation (``window`` integers) plus the shard counts.

Position p of a rank's epoch is the p-th entry of its order: window p // window, entry p % window.
Positions past L wrap around to the start of the span: a worker that skips bad samples keeps
filling batches, so every rank still yields the same number of batches (collectives stay matched).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def mix_seed(*parts: int) -> int:
    """A distinct, reproducible 31-bit seed per tuple of non-negative integers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class EpochPlan:
    counts: tuple[int, ...]  # samples per shard, in the manifest's order
    seed: int | None  # None: no shuffling at all (evaluation reads in manifest order)
    epoch: int
    rank: int
    world_size: int
    window: int

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size}")
        if self.window < 1:
            raise ValueError(f"shuffle window must be at least 1 sample, got {self.window}")

    @cached_property
    def shard_order(self) -> np.ndarray:
        order = np.arange(len(self.counts))
        if self.seed is None:
            return order
        return np.random.default_rng(mix_seed(self.seed, self.epoch)).permutation(order)

    @cached_property
    def _starts(self) -> np.ndarray:
        """Global position at which each shard of ``shard_order`` starts (one extra entry: N)."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.counts, np.int64)[self.shard_order])])

    @property
    def span_length(self) -> int:
        """L: the samples of this epoch that this rank owns (the same on every rank)."""
        return int(self._starts[-1]) // self.world_size

    @property
    def num_windows(self) -> int:
        return -(-self.span_length // self.window)

    def window_order(self, window_index: int) -> np.ndarray:
        """Span offsets of one window, in reading order."""
        first = window_index * self.window
        offsets = np.arange(first, min(first + self.window, self.span_length))
        if self.seed is None:
            return offsets
        rng = np.random.default_rng(mix_seed(self.seed, self.epoch, self.rank, window_index))
        return rng.permutation(offsets)

    def locate(self, span_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index in the manifest's order, sample index inside that shard) of span offsets."""
        positions = self.rank * self.span_length + np.asarray(span_offsets, np.int64)
        slot = np.searchsorted(self._starts, positions, side="right") - 1
        return self.shard_order[slot], positions - self._starts[slot]

    def shards_of_window(self, window_index: int) -> list[int]:
        """The shards (manifest order) that hold the window's samples, in the order they are laid out."""
        first = window_index * self.window
        last = min(first + self.window, self.span_length) - 1
        if last < first:
            return []
        positions = self.rank * self.span_length + np.array([first, last])
        slots = np.searchsorted(self._starts, positions, side="right") - 1
        return [int(s) for s in self.shard_order[slots[0]:slots[1] + 1]]

    def entries(self, start: int = 0) -> Iterator[tuple[int, int, int, int]]:
        """(position, window index, shard, sample in shard) from ``start`` on, forever (wrapping
        past the span's end: see the module docstring). Needs a non-empty span."""
        if self.span_length == 0:
            raise ValueError(f"rank {self.rank} of {self.world_size} owns no sample of {sum(self.counts)}")
        position = start
        while True:
            wrapped = position % self.span_length
            window_index = wrapped // self.window
            order = self.window_order(window_index)
            shards, samples = self.locate(order)
            for k in range(wrapped - window_index * self.window, len(order)):
                yield position, window_index, int(shards[k]), int(samples[k])
                position += 1
