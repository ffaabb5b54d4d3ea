"""Config of the latent DiT step."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from components.common.config import StrictModel, StepConfig
from components.common.trainer import TrainConfig


class SamplingConfig(StrictModel):
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1)
    # Which `steps` of the training timesteps to visit (Lin et al. 2023, table 2). "trailing" starts
    # at t = T-1, the level the initial pure noise matches; "leading" (the DDIM paper's) starts lower.
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    guidance: float = Field(4.0, ge=0)  # classifier-free guidance w: eps = (1+w) eps(x,y) - w eps(x,0)
    eta: float = Field(0.0, ge=0, le=1)  # DDIM only
    # Applied to the predicted x0 (Imagen). In latent space usually "none": scaled latents are not
    # confined to [-1, 1], so clipping them distorts the image instead of correcting drift.
    thresholding: Literal["none", "static", "dynamic"] = "none"
    dynamic_threshold_percentile: float = Field(0.995, gt=0, le=1)
    seed: int = 0


class DitConfig(StepConfig):
    preset: str = "DiT-Tiny/2"  # a key of DIT_PRESETS
    model: dict[str, Any] = Field(default_factory=dict)  # overrides of the preset's arguments
    schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    num_timesteps: int = Field(1000, ge=2)
    prediction: Literal["eps", "v", "x0"] = "eps"
    learn_sigma: bool = False  # learned variance, trained with L_hybrid
    vlb_weight: float = Field(0.001, ge=0)  # lambda of L_hybrid
    class_dropout_prob: float = Field(0.1, ge=0, lt=1)  # label dropout for classifier-free guidance
    # "latents": train on the latents step's pre-extracted latents; "pixels": encode every batch
    # with the autoencoder on the fly (slower; kept to measure the difference)
    data: Literal["latents", "pixels"] = "latents"
    # initialise from a registered DiT, e.g. "models:/mnist-dit@champion" (see common/warm_start.py)
    warm_start: str | None = None
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=2000, batch_size=128, lr=3e-4,
                                                                   ema_decay=0.999))
    sample: SamplingConfig = Field(default_factory=SamplingConfig)  # the grid logged at the end
    grid_per_label: int = Field(8, ge=1)  # columns of samples.png
    # rows of samples.png: this many classes, evenly spaced over all of them (all when fewer)
    grid_classes: int = Field(10, ge=1)
