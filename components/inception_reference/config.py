"""Config of the inception_reference step (built from ``evaluate.inception`` by the pipeline config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.common.config import StepConfig, StrictModel


class ReferenceTarget(StrictModel):
    """One resolution the evaluate step scores at, and how the real images are brought to it."""

    name: Literal["base", "cascade"]
    size: int = Field(..., ge=8)
    filter: str = "bicubic"  # the resampler's filter (components/common/resample.py)


class InceptionReferenceConfig(StepConfig):
    """The ``inception_reference`` step; built from ``evaluate.inception`` by the pipeline config."""

    targets: list[ReferenceTarget]
    samples_per_class: int = Field(..., ge=1)  # size of the real-data baseline, per class
    reference_samples: int | None = Field(..., ge=2)  # μ and Σ are over these; None: the whole train split
    kid_reference_samples: int = Field(10_000, ge=2)  # features kept for KID: the lowest-hash of those
    seed: int = 0
    batch_size: int = Field(50, ge=1)
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
