"""Config of the noisy_classifier step."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from components.common.config import StepConfig, known_preset
from components.noisy_classifier.presets import NOISY_CLASSIFIER_PRESETS
from components.common.train_types import TrainConfig


class NoisyClassifierConfig(StepConfig):
    preset: str = "nc-small"  # a key of NOISY_CLASSIFIER_PRESETS
    model: dict = Field(default_factory=dict)  # overrides of the preset's arguments
    # The forward process it is trained on; it must be the DiT's (the pipeline config checks).
    schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    num_timesteps: int = Field(1000, ge=2)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=2000, batch_size=128, lr=1e-3,
                                                                   ema_decay=0.999))
    t_buckets: int = Field(4, ge=1, le=20)  # validation accuracy reported over this many equal ranges of t
    val_samples: int | None = Field(2000, ge=1)  # validation latents scored per bucket (None: all)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        return known_preset(value, NOISY_CLASSIFIER_PRESETS, "noisy classifier")
