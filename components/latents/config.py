"""Config of the latents step."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.common.config import StepConfig


class LatentsConfig(StepConfig):
    batch_size: int = Field(256, ge=1)  # images per encoder forward
    # "mode": the posterior mean (deterministic); "sample": one draw per image, seeded by its key
    # (KL autoencoders only: a VQ encoder has no posterior to sample, and the step refuses it)
    posterior: Literal["mode", "sample"] = "mode"
    dtype: Literal["float32", "float16"] = "float32"  # storage dtype of the .npy latents
