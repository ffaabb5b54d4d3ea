"""What "the same images whatever the batch size" means on CPUs (README, "The CLI").

CPU BLAS kernels block a matrix product differently for different batch sizes, so the same sample
drawn in batches of 7 and of 3 can differ in the last bits of its floats, and a pixel that lands
on a rounding boundary can come out one uint8 level apart. The promise is therefore: every pixel
within one level, and at most 1% of them off at all. Tests assert that, never bit equality, when
they compare batch sizes (or machines); the same batch size on the same machine is bit-identical.
"""

from __future__ import annotations

import torch

MAX_LEVELS = 1
MAX_FRACTION_OFF = 0.01


def assert_same_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8, (a.shape, a.dtype, b.shape, b.dtype)
    difference = (a.int() - b.int()).abs()
    worst, fraction = int(difference.max()), float((difference > 0).float().mean())
    assert worst <= MAX_LEVELS, f"a pixel differs by {worst} levels (at most {MAX_LEVELS} allowed)"
    assert fraction <= MAX_FRACTION_OFF, f"{fraction:.2%} of pixels differ (at most {MAX_FRACTION_OFF:.0%})"
