"""What the trainer trains in the autoencoder step (a ``TrainTask``): the autoencoder, with a
patch discriminator when ``disc_start`` is set, and their joint loss.

One ``nn.Module`` (``AutoencoderTrainModule``) holds the ``AutoencoderKL`` (or ``AutoencoderVQ``)
and, when ``disc_start`` is set, a ``PatchDiscriminator``; ONE DeepSpeed engine and optimizer train
both, from one backward over the sum of (see ``autoencoder_losses``)

    rec + lpips_weight·LPIPS + kl_weight·KL/pixels          autoencoder (LDM's loss / pixel count)
      (vq: + β·commitment instead of the KL term; the codebook follows its own EMA, quantize.py)
    + [step >= disc_start] adaptive_weight·disc_weight·g     autoencoder, through the critic
    + [step >= disc_start] hinge(D(x), D(x̂))                 discriminator

Gradient separation, which makes the single backward correct:
- the generator term calls the discriminator with ``torch.func.functional_call`` on *detached*
  copies of its parameters: its gradient reaches the autoencoder through x̂, never the critic;
- the hinge term sees ``x.detach()`` and ``x̂.detach()``: its gradient reaches only the critic.
So each network gets exactly the gradient of its own objective (LDM's two optimizers, with one).
Shared by both: the learning rate, its schedule, and ``grad_clip`` over the joint gradient norm.
The discriminator needs ZeRO 0-2 (stage 3 partitions the parameters functional_call would copy).

KL is LDM's (summed over latent dimensions, mean over the batch) divided by the pixel count, like
the mean reconstruction loss, so ``kl_weight`` means what it means in LDM configs (1e-6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.autoencoder.config import AutoencoderConfig
from components.autoencoder.discriminator import PatchDiscriminator, adaptive_disc_weight, hinge_d_loss
from components.autoencoder.load import AE_WEIGHTS, to_model_range
from components.autoencoder.lpips import load_lpips
from components.autoencoder.model import AUTOENCODER_CLASSES
from components.common.step import Manifest


class AutoencoderTrainModule(nn.Module):
    """What DeepSpeed trains: ``ae`` and, with a GAN loss, ``disc`` (None otherwise)."""

    def __init__(self, model_kwargs: dict[str, Any], cfg: AutoencoderConfig):
        super().__init__()
        self.ae = AUTOENCODER_CLASSES[cfg.regularizer](**model_kwargs)
        self.disc = (PatchDiscriminator(model_kwargs["in_channels"], cfg.disc_channels, cfg.disc_layers)
                     if cfg.disc_start is not None else None)


def gan_active(cfg: AutoencoderConfig, step: int) -> bool:
    return cfg.disc_start is not None and step >= cfg.disc_start


def autoencoder_losses(module: AutoencoderTrainModule, images: torch.Tensor, step: int, cfg: AutoencoderConfig,
                       generator: torch.Generator | None = None,
                       lpips: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(total loss, metrics) of one batch in [-1, 1]; see the module docstring for the terms."""
    ae = module.ae
    if cfg.regularizer == "kl":
        posterior = ae.encode(images)
        recon = ae.decode(posterior.sample(generator))  # (N, C, H, W)
    else:  # the generator picks the encoder outputs that re-seed dead codes
        quantized, vq_loss, codes = ae.quantize(ae.encode(images).mode(), generator)  # (N, c, h, w)
        recon = ae.decode_quantized(quantized)  # (N, C, H, W)
    x, xr = images.float(), recon.float()
    pixel = (x - xr).abs() if cfg.reconstruction_loss == "l1" else (x - xr).pow(2)
    rec = pixel.mean()
    nll = rec
    metrics: dict[str, float] = {"rec_loss": rec.item()}
    if lpips is not None and cfg.lpips_weight > 0:
        perceptual = lpips(x, xr).mean()
        nll = nll + cfg.lpips_weight * perceptual
        metrics["lpips"] = perceptual.item()
    if cfg.regularizer == "kl":
        kl = posterior.kl().float().mean()  # summed over latent dims, mean over the batch
        loss = nll + cfg.kl_weight * kl / x[0].numel()
        metrics["kl"] = kl.item()
    else:  # codebook statistics of the batch (all workers')
        loss = nll + vq_loss
        metrics.update(vq_loss=vq_loss.item(), vq_batch_usage=codes.usage.item(),
                       vq_batch_perplexity=codes.perplexity.item())
    if gan_active(cfg, step):
        disc = module.disc
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        logits_fake = torch.func.functional_call(disc, frozen, (recon,))  # grads reach only the ae
        g_loss = -logits_fake.float().mean()
        d_weight = adaptive_disc_weight(nll, g_loss, ae.last_layer_weight(), cfg.disc_weight)
        d_loss = hinge_d_loss(disc(images.detach()).float(), disc(recon.detach()).float())  # only the disc
        loss = loss + d_weight * g_loss + d_loss
        metrics.update(g_loss=g_loss.item(), d_loss=d_loss.item(), d_weight=float(d_weight))
    return loss, metrics


class AutoencoderTask:
    """TrainTask of the step: holds configs and the shard manifest; each worker streams its share of
    the training images at the base size (or of ``in_memory`` uint8 images: tests, benchmarks)."""

    def __init__(self, cfg: AutoencoderConfig, model_kwargs: dict[str, Any], shard: Manifest | None,
                 image_size: int | None = None, in_memory: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cfg, self.model_kwargs, self.image_size = cfg, model_kwargs, image_size
        self.shard_manifest, self.in_memory = shard, in_memory
        self._lpips: nn.Module | None = None

    def __getstate__(self):  # ship configs, not caches
        return {**self.__dict__, "_lpips": None}

    def build_model(self) -> nn.Module:
        return AutoencoderTrainModule(self.model_kwargs, self.cfg)

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.common.task_parts import ConvertImages, image_source

        return image_source(self.shard_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch,
                            size=self.image_size, transform=ConvertImages(to_model_range))

    def perceptual(self, device) -> nn.Module | None:
        if self.cfg.lpips_weights is None:
            return None
        if self._lpips is None:
            self._lpips = load_lpips(self.cfg.lpips_weights).to(device)
        return self._lpips

    def loss(self, model, batch, step, generator):
        module = getattr(model, "module", model)  # the DeepSpeed engine's module
        images = batch["image"]
        return autoencoder_losses(module, images, step, self.cfg, generator, self.perceptual(images.device))

    def export(self, model, ema_model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().float().cpu().contiguous() for k, v in ema_model.ae.state_dict().items()}
        save_file(state, str(out_dir / AE_WEIGHTS), metadata={"preset": self.cfg.preset})
