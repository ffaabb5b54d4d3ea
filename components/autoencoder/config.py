"""Config of the autoencoder step (KL- or VQ-regularised, as in Latent Diffusion)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from components.common.config import StepConfig, StrictModel, known_preset
from components.autoencoder.presets import AUTOENCODER_PRESETS
from components.common.train_types import TrainConfig


class VQConfig(StrictModel):
    """The codebook of ``regularizer: vq`` (see ``quantize.py``). Its dimension is the model's
    ``latent_channels`` (LDM's embed_dim): set ``autoencoder.model.latent_channels`` to change it."""

    codebook_size: int = Field(512, ge=2)
    beta: float = Field(0.25, ge=0)  # commitment weight (VQ-VAE, LDM: 0.25)
    ema_decay: float = Field(0.99, gt=0, lt=1)  # of the codebook's cluster sizes and sums (VQ-VAE: 0.99)
    # a code whose EMA cluster size (assignments per step, all workers) falls below this is
    # re-seeded from an encoder output of the batch; 0: never
    dead_code_threshold: float = Field(1.0, ge=0)
    epsilon: float = Field(1e-5, gt=0)  # Laplace smoothing of the cluster sizes (Sonnet: 1e-5)


class AutoencoderConfig(StepConfig):
    preset: str = "ae-mnist"  # a key of AUTOENCODER_PRESETS
    # The base resolution: the autoencoder, latents, DiT and evaluate work at this size (the shard
    # images resized, bicubic, antialiased). None: the shard images' size. Below it, a cascade's
    # super-resolution stages take the samples up to the shard size.
    image_size: int | None = Field(None, ge=8)
    model: dict[str, Any] = Field(default_factory=dict)  # overrides of the preset's arguments
    # "kl": Gaussian posterior + kl_weight·KL; "vq": EMA codebook (the vq section) + β·commitment
    regularizer: Literal["kl", "vq"] = "kl"
    kl_weight: float = Field(1e-6, ge=0)  # kl only
    vq: VQConfig = Field(default_factory=VQConfig)  # vq only
    reconstruction_loss: Literal["l1", "l2"] = "l1"
    # PatchGAN discriminator: switched on at this optimizer step (None: never)
    disc_start: int | None = Field(None, ge=0)
    disc_weight: float = Field(0.5, ge=0)
    disc_channels: int = Field(64, ge=1)  # PatchDiscriminator base width (LDM: 64)
    disc_layers: int = Field(3, ge=1)  # its strided layers; 3 suits 32..256 px
    # LPIPS perceptual loss, only from weights already on disk (never downloaded); None: off
    lpips_weights: str | None = None
    lpips_weight: float = Field(1.0, ge=0)
    # latents are multiplied by 1/std of the encoder's output on this many training images (LDM)
    scale_estimate_samples: int = Field(1024, ge=16)
    val_samples: int = Field(512, ge=8)  # PSNR/MSE on this many validation images
    # ema_decay 0.99: the exported EMA weights keep 0.99**500 < 1% of the initial weights after
    # 500 steps; 0.999 would keep 61%.
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=500, batch_size=64, lr=1e-3,
                                                                   ema_decay=0.99))

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        return known_preset(value, AUTOENCODER_PRESETS, "autoencoder")

    def cache_relevant(self) -> dict[str, Any]:
        """Only the chosen regularizer's settings: a kl config keeps the cache key it had before
        ``vq`` existed, and a vq config does not re-run for a new ``kl_weight``."""
        dumped = super().cache_relevant()
        dumped.pop("vq" if self.regularizer == "kl" else "kl_weight")
        return dumped
