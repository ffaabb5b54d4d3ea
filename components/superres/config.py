"""Config of one super-resolution stage (a ``superres`` list entry of the pipeline config)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from components.common.config import StepConfig, StrictModel, known_preset
from components.superres.presets import SUPERRES_PRESETS
from components.common.train_types import TrainConfig
from components.text.config import TextEncoderConfig


class NoiseAugmentationConfig(StrictModel):
    enabled: bool = True
    # training levels s ~ U{0 .. max_level * (T-1)} of the stage's schedule, one per example
    max_level: float = Field(0.5, ge=0, le=1)


class BlurAugmentationConfig(StrictModel):
    enabled: bool = False
    probability: float = Field(0.5, ge=0, le=1)  # of blurring an example
    kernel_size: int = Field(3, ge=1)  # odd
    sigma_min: float = Field(0.4, ge=0)
    sigma_max: float = Field(0.6, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.sigma_max < self.sigma_min:
            raise ValueError(f"sigma_max {self.sigma_max} < sigma_min {self.sigma_min}")
        return self


class AugmentationConfig(StrictModel):
    noise: NoiseAugmentationConfig = Field(default_factory=NoiseAugmentationConfig)
    blur: BlurAugmentationConfig = Field(default_factory=BlurAugmentationConfig)


class SuperResSamplingConfig(StrictModel):
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(25, ge=1)
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    eta: float = Field(0.0, ge=0, le=1)
    guidance: float = Field(0.0, ge=0)  # classifier-free: nulls the class and/or the text (empty caption)
    thresholding: Literal["none", "static", "dynamic"] = "static"  # pixels live in [-1, 1]
    dynamic_threshold_percentile: float = Field(0.995, gt=0, le=1)
    # fixed noise-conditioning augmentation level of the low-resolution input at sampling time, as a
    # fraction of the schedule (never random); the non-truncated hand-off corrupts the lower stage's
    # output to this level, the truncated one stops the lower stage there
    noise_cond_aug_level: float = Field(0.1, ge=0, le=1)
    handoff: Literal["non_truncated", "truncated"] = "non_truncated"
    seed: int = 0

    # Was ``aug_level``: cache keys keep hashing the old name (cache_names), and settings recorded
    # under it (a stage's superres.json, an older pipeline file) still load.
    cache_names: ClassVar[dict[str, str]] = {"noise_cond_aug_level": "aug_level"}

    @model_validator(mode="before")
    @classmethod
    def _accept_old_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for new, old in cls.cache_names.items():
            if old in data:
                if new in data:
                    raise ValueError(f"{old} is the old name of {new}: give only {new}")
                data[new] = data.pop(old)
        return data


class SuperResConfig(StepConfig):
    input_size: int = Field(..., ge=4)  # low-resolution side, pixels
    output_size: int = Field(..., ge=8)
    preset: str = "sr-mnist"  # a key of SUPERRES_PRESETS
    model: dict[str, Any] = Field(default_factory=dict)  # overrides of the preset's arguments
    # how training pairs (downsample(x), x) are made from the shard images, both ways
    filter: Literal["bicubic", "bilinear", "area"] = "bicubic"
    schedule: Literal["linear", "cosine"] = "cosine"
    num_timesteps: int = Field(1000, ge=2)
    # v (Salimans & Ho 2022; Imagen's SR models): at low SNR an eps-model barely needs the
    # conditioning to get its loss down, and its x0 estimate is ill-conditioned; a v-model must
    # say what the image is, which the low-resolution input tells it
    prediction: Literal["eps", "v"] = "v"
    # initialise from a registered stage, e.g. "models:/mnist-superres_1@champion" (common/warm_start.py)
    warm_start: str | None = None
    class_conditional: bool = False
    class_dropout_prob: float = Field(0.1, ge=0, lt=1)
    # Text conditioning (Imagen's SR stages take the text too): the shards' captions, encoded by the
    # stage's own encoder (a joint one trained with it, or a frozen one), the *pooled* embedding added
    # to the U-Net's conditioning vector; text.caption_dropout trains the null (empty caption) branch.
    text: TextEncoderConfig | None = None
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=1000, batch_size=32, lr=2e-4,
                                                                   ema_decay=0.999))
    sample: SuperResSamplingConfig = Field(default_factory=SuperResSamplingConfig)
    # evaluation on validation images: PSNR/SSIM from the true low-res input and from a degraded one
    eval_samples: int = Field(64, ge=1)
    degrade_blur_sigma: float = Field(1.0, ge=0)
    degrade_noise_std: float = Field(0.1, ge=0)  # in the [-1, 1] range
    grid_samples: int = Field(8, ge=1)  # columns of the low | super-resolved | truth grid

    cache_added: ClassVar[dict[str, Any]] = {"text": None}  # no text: the keys of before

    @field_validator("output_size")
    @classmethod
    def _larger(cls, value, info):
        low = info.data.get("input_size")
        if low is not None and value <= low:
            raise ValueError(f"output_size {value} must be larger than input_size {low}")
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        return known_preset(value, SUPERRES_PRESETS, "super-resolution")
