"""Config of the distill step."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.common.config import StrictModel, StepConfig
from components.common.train_types import TrainConfig


class ProgressiveConfig(StrictModel):
    """Salimans & Ho 2022: rounds halve the sampler's DDIM steps from ``start_steps`` to ``end_steps``."""

    start_steps: int = Field(64, ge=2)  # the teacher's steps in the first round
    end_steps: int = Field(4, ge=1)  # the final student's native steps

    @model_validator(mode="after")
    def _power_of_two_ratio(self):
        ratio = self.start_steps // self.end_steps
        if self.start_steps % self.end_steps or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"progressive: start_steps / end_steps must be a power of two >= 2 (each round "
                             f"halves), got {self.start_steps} / {self.end_steps}")
        return self

    @property
    def rounds(self) -> list[int]:
        """The teacher's steps of each round: start, start/2, ..., 2 x end."""
        steps, out = self.start_steps, []
        while steps > self.end_steps:
            out.append(steps)
            steps //= 2
        return out


class ConsistencyConfig(StrictModel):
    """Song et al. 2023. Levels are timesteps of the DiT's schedule: ``num_levels`` of them, spaced
    as Karras et al.'s sigmas (rho) between the schedule's smallest and largest noise."""

    num_levels: int = Field(18, ge=3)  # N, the ODE discretisation (CD); CT's final N
    rho: float = Field(7.0, gt=0)
    solver: Literal["heun", "euler"] = "heun"  # CD's step along the teacher's probability-flow ODE
    # lpips: LPIPS between the decoded images (the autoencoder decodes both sides), from local
    # weights only (``lpips_weights``, a safetensors file; nothing is downloaded)
    distance: Literal["l2", "l1", "pseudo_huber", "lpips"] = "pseudo_huber"
    lpips_weights: str | None = None
    target_ema_decay: float = Field(0.95, ge=0, lt=1)  # mu of the target network theta- (CD)
    # CT's curriculum (Song et al. 2023, app. C): N grows from ct_initial_levels to num_levels,
    # the target decay is mu(k) = exp(s0 log(ct_initial_ema) / N(k)).
    ct_initial_levels: int = Field(2, ge=2)
    ct_initial_ema: float = Field(0.9, ge=0, lt=1)
    # Multistep sampling: the timesteps at which the sample is re-noised, highest first. Two-step
    # sampling uses the first entry (Song et al. choose it by search; the evaluate step's table
    # scores 1 and 2 steps).
    sample_levels: list[int] = Field(default_factory=lambda: [500])

    @model_validator(mode="after")
    def _lpips_needs_weights(self):
        if self.distance == "lpips" and not self.lpips_weights:
            raise ValueError("consistency.distance: lpips needs consistency.lpips_weights, a local safetensors file "
                             "of lpips.LPIPS(net='vgg') (weights are never downloaded); or use pseudo_huber")
        return self


class DistillConfig(StepConfig):
    method: Literal["progressive", "consistency_distillation", "consistency_training"] = "progressive"
    # The classifier-free guidance weight the teacher is distilled at (folded into the student,
    # which then samples with one network evaluation per step). None: the DiT step's sample.guidance.
    guidance: float | None = Field(None, ge=0)
    # "dit": the student starts as a copy of the DiT (required by progressive and CD); CT may start
    # from "scratch" (random weights) as in Song et al.
    student_init: Literal["dit", "scratch"] = "dit"
    progressive: ProgressiveConfig = Field(default_factory=ProgressiveConfig)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    # One progressive round, or the whole consistency run. The EMA weights are what samples.
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=500, batch_size=64, lr=1e-4,
                                                                   ema_decay=0.99))
    grid_per_label: int = Field(8, ge=1)  # columns of each sample grid
    grid_classes: int = Field(10, ge=1)
    seed: int = 0  # of the grids' samples

    @model_validator(mode="after")
    def _init_fits_method(self):
        if self.student_init == "scratch" and self.method != "consistency_training":
            raise ValueError(f"distill.student_init: scratch is only for consistency_training; {self.method} "
                             "starts the student as a copy of the DiT")
        return self
