"""Config of the evaluate step."""

from __future__ import annotations

from pydantic import Field

from components.common.config import StrictModel, StepConfig
from components.dit.config import SamplingConfig


class ClassifierTrainConfig(StrictModel):
    preset: str = "cnn-small"  # a key of CLASSIFIER_PRESETS
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)  # AdamW peak; short linear warm-up, cosine decay to 0
    seed: int = 0
    # augmentation: every training image is shifted by a random whole number of pixels in
    # [-max_shift, max_shift] along each axis (0: off); generated digits are rarely centred exactly
    max_shift: int = Field(2, ge=0)


class EvaluateConfig(StepConfig):
    classifier: ClassifierTrainConfig = Field(default_factory=ClassifierTrainConfig)
    samples_per_class: int = Field(100, ge=2)
    sample: SamplingConfig = Field(default_factory=SamplingConfig)
    batch_size: int = Field(250, ge=1)  # generation batch
    grid_per_class: int = Field(10, ge=1)  # columns of eval_samples.png (at most samples_per_class)
    # With super-resolution stages: this many of each class's samples go through the cascade and are
    # judged at the final size by a classifier trained like ``classifier`` (or ``cascade_classifier``).
    cascade_samples_per_class: int = Field(20, ge=2)
    cascade_classifier: ClassifierTrainConfig | None = None
    # With a distill step: the teacher is scored at these DDIM steps (``sample``'s other settings)
    # and the student at its own, on distill_samples_per_class per class (None: samples_per_class).
    teacher_steps: list[int] = Field(default_factory=lambda: [64, 32, 16, 8, 4])
    distill_samples_per_class: int | None = Field(None, ge=2)
