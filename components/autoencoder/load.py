"""The autoencoder step's contract with the steps after it: how to load its output and move
between images and *scaled* latents.

The step writes two files:

- ``autoencoder.safetensors`` (``AE_WEIGHTS``): the EMA weights of the ``AutoencoderKL`` or
  ``AutoencoderVQ`` only (no discriminator), fp32; a VQ model's codebook buffers (``quantizer.*``)
  are the live ones (the trainer's EMA copies buffers), the rest are EMA weights;
- ``autoencoder.json`` (``AE_META``): ``preset``; ``regularizer`` ("kl" or "vq"; absent in
  files written before VQ existed: "kl"); ``model`` (the resolved keyword arguments of that class,
  codebook arguments included, enough to rebuild it without the presets table);
  ``downsample_factor`` (f); ``latent_channels``; ``latent_shape`` [c, H/f, W/f]; ``image_size``;
  ``channels``; ``image_format``; ``scale_factor``; ``scale_from`` ("sample": 1/std of posterior
  samples, LDM; "pre_quantization": 1/std of a VQ encoder's outputs); ``classes`` (list of names or
  null).

Diffusion models work on ``z * scale_factor`` (unit variance), never on raw ``z``; use
``encode_scaled``/``decode_scaled`` and the factor cannot be forgotten or applied twice. For a VQ
autoencoder ``z`` is the continuous pre-quantisation latent, and decoding quantises it first.
The file reads back as ``AutoencoderMeta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from components.autoencoder.model import AUTOENCODER_CLASSES, AutoencoderKL, AutoencoderVQ
from components.common.stage_meta import StageMeta

if TYPE_CHECKING:
    from components.common.step import Manifest

AE_WEIGHTS = "autoencoder.safetensors"
AE_META = "autoencoder.json"


class AutoencoderLoadError(RuntimeError):
    pass


@dataclass
class AutoencoderMeta(StageMeta):
    """``autoencoder.json`` (KL or VQ)."""

    preset: str
    model: dict[str, Any]  # the resolved arguments of the regularizer's class
    downsample_factor: int
    latent_channels: int
    latent_shape: list[int]  # [c, H/f, W/f]
    image_size: int  # the size it encodes (the base resolution)
    channels: int
    image_format: str
    scale_factor: float  # diffusion models work on z * scale_factor
    scale_from: str  # "sample" (KL posterior samples) or "pre_quantization" (a VQ encoder's outputs)
    classes: list[str] | None
    regularizer: str | None = None  # "kl" or "vq"; files from before VQ have none: "kl"
    shard_image_size: int | None = None  # the shard step's image size (files from before the SR stages lack it)

    @property
    def kind(self) -> str:
        """The regularizer, "kl" for the files written before VQ existed."""
        return self.regularizer or "kl"


def load_autoencoder(manifest: "Manifest", device: str | torch.device = "cpu"
                     ) -> tuple[AutoencoderKL | AutoencoderVQ, AutoencoderMeta]:
    """(model in eval mode on ``device``, meta) from the autoencoder step's manifest, local or
    on S3. The weights' sha256 is checked against the manifest; nothing is unpickled."""
    from safetensors.torch import load as load_safetensors

    from components.common.step import read_output

    try:
        meta = AutoencoderMeta.read(manifest, AE_META)
        data = read_output(manifest, AE_WEIGHTS)  # checked against the manifest's sha256
    except KeyError as e:
        raise AutoencoderLoadError(f"{manifest.output_uri}: the manifest does not list {e}") from e
    if meta.kind not in AUTOENCODER_CLASSES:
        raise AutoencoderLoadError(f"{manifest.uri(AE_META)}: unknown regularizer {meta.kind!r}")
    model = AUTOENCODER_CLASSES[meta.kind](**meta.model)
    model.load_state_dict(load_safetensors(data), strict=True)
    return model.to(device).eval(), meta


def to_model_range(images) -> torch.Tensor:
    """uint8 images (0..255, tensor or array) -> float32 in [-1, 1]; float input is taken as
    already in [-1, 1]. (N, C, H, W)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1.0)
    return images.float()


@torch.no_grad()
def encode_scaled(model: AutoencoderKL | AutoencoderVQ, meta: "AutoencoderMeta | dict", images,
                  generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
    """Images (N, C, H, W), uint8 or float in [-1, 1] -> scaled latents (N, c, H/f, W/f):
    the posterior mode (or a sample with ``sample=True``; a VQ encoder is deterministic, both are
    its pre-quantisation latent) times ``meta.scale_factor`` (``meta``: typed, or its JSON form)."""
    param = next(model.parameters())
    x = to_model_range(images).to(param.device, param.dtype)
    posterior = model.encode(x)
    z = posterior.sample(generator) if sample else posterior.mode()  # (N, c, h, w)
    return z * AutoencoderMeta.of(meta).scale_factor


@torch.no_grad()
def decode_scaled(model: AutoencoderKL | AutoencoderVQ, meta: "AutoencoderMeta | dict",
                  latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (N, c, h, w) -> images (N, C, H, W) in [-1, 1] (clamped), float32; a VQ
    model snaps them to its codebook first."""
    param = next(model.parameters())
    z = latents.to(param.device, param.dtype) / AutoencoderMeta.of(meta).scale_factor
    return model.decode(z).float().clamp(-1.0, 1.0)  # (N, C, H, W)
