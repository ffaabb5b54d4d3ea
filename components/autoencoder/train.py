"""Autoencoder step: train LDM's first stage, KL- or VQ-regularised (``regularizer``), on the shard
step's images.

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

After ``fit``, on the step's own task: load the exported EMA weights, estimate the latent scale
factor (1/std of posterior *samples* over ``scale_estimate_samples`` training images, LDM; vq: of
the pre-quantisation latents), measure PSNR/MSE of posterior-*mode* reconstructions of
``val_samples`` validation images (vq: through the codebook, with its usage and perplexity over
those images), and write ``autoencoder.safetensors``, ``autoencoder.json`` (see ``load.py``) and
``reconstructions.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.autoencoder.config import AutoencoderConfig
from components.autoencoder.discriminator import PatchDiscriminator, adaptive_disc_weight, hinge_d_loss
from components.autoencoder.load import AE_META, AE_WEIGHTS, to_model_range
from components.autoencoder.lpips import check_lpips_file, load_lpips
from components.autoencoder.model import (AUTOENCODER_CLASSES, AUTOENCODER_PRESETS, AutoencoderKL, AutoencoderVQ,
                                          build_autoencoder)
from components.autoencoder.quantize import code_statistics
from components.common.model_args import with_data_fixed
from components.common.images import image_grid
from components.common.shard_reader import read_image_shards
from components.common.step import Manifest, StepContext, StepOutput
from components.common.storage import Storage
from components.common.tracking import png_bytes
from components.common.trainer import fit

CODE_VERSION = "1"
RECONSTRUCTIONS = "reconstructions.png"
GRID_PAIRS, PAIRS_PER_ROW = 32, 8
EVAL_BATCH = 256

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------- evaluation on the step task


def build_step_autoencoder(cfg: AutoencoderConfig, info: dict[str, Any]) -> AutoencoderKL | AutoencoderVQ:
    """The step's autoencoder through ``build_autoencoder``: the preset with ``cfg.model`` applied,
    its input channels the shards' (a setting that disagrees is refused) and its factor checked
    against their size; for ``regularizer: vq`` the ``vq`` section's codebook arguments are added.
    Its ``arguments`` are what autoencoder.json records."""
    if cfg.preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"autoencoder.preset: unknown {cfg.preset!r}; valid: {', '.join(AUTOENCODER_PRESETS)}")
    unknown = set(cfg.model) - set(AUTOENCODER_PRESETS[cfg.preset])
    if unknown:
        raise ValueError(f"autoencoder.model: unknown argument(s) {sorted(unknown)}; "
                         f"valid: {sorted(AUTOENCODER_PRESETS[cfg.preset])}")
    overrides = {**cfg.model, **with_data_fixed("autoencoder", cfg.model, {"in_channels": int(info["channels"])})}
    f = 2 ** (len({**AUTOENCODER_PRESETS[cfg.preset], **overrides}["channel_mult"]) - 1)
    size = base_size(cfg, info)
    if size % f:
        raise ValueError(f"image_size {size} is not divisible by the autoencoder's factor f={f}")
    if cfg.regularizer == "vq":
        overrides.update(cfg.vq.model_dump())
    return build_autoencoder(cfg.preset, cfg.regularizer, **overrides)


def base_size(cfg: AutoencoderConfig, info: dict[str, Any]) -> int:
    """The size the autoencoder (and every step after it) works at."""
    return int(cfg.image_size or info["image_size"])


@torch.no_grad()
def estimate_scale_factor(model: AutoencoderKL | AutoencoderVQ, images: np.ndarray, seed: int = 0) -> float:
    """1 / std of posterior samples over ``images`` (all latent elements together), as in LDM; for
    a VQ model the "sample" is the pre-quantisation latent."""
    generator = torch.Generator().manual_seed(seed)
    latents = [model.encode(to_model_range(images[i:i + EVAL_BATCH])).sample(generator)
               for i in range(0, len(images), EVAL_BATCH)]
    return 1.0 / float(torch.cat(latents).float().std())


@torch.no_grad()
def reconstruction_metrics(model: AutoencoderKL | AutoencoderVQ,
                           images: np.ndarray) -> tuple[dict[str, float], torch.Tensor]:
    """({"val_psnr", "val_mse"}, reconstructions in [-1, 1]) of posterior-mode reconstructions.
    MSE on [0, 1] pixels per image; PSNR is the mean of per-image 10·log10(1/MSE). A VQ model
    (in eval mode, so that measuring does not move its codebook) adds "val_codebook_usage" (fraction
    of codes that some position of these images uses) and "val_codebook_perplexity" (exp of the
    entropy of the codes' frequencies over them)."""
    vq = isinstance(model, AutoencoderVQ)
    if vq and model.training:
        raise ValueError("reconstruction_metrics: put the VQ autoencoder in eval mode first (in train mode "
                         "every forward updates its codebook)")
    chunks, counts = [], None
    for i in range(0, len(images), EVAL_BATCH):
        z = model.encode(to_model_range(images[i:i + EVAL_BATCH])).mode()  # (B, c, h, w)
        if vq:
            quantized, _, codes = model.quantize(z)
            counts = codes.counts if counts is None else counts + codes.counts
            chunks.append(model.decode_quantized(quantized).clamp(-1, 1))
        else:
            chunks.append(model.decode(z).clamp(-1, 1))
    recons = torch.cat(chunks)
    mse = ((recons - to_model_range(images)) / 2).pow(2).flatten(1).mean(1)  # (N,)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    quality = {"val_psnr": float(psnr.mean()), "val_mse": float(mse.mean())}
    if vq:
        usage, perplexity = code_statistics(counts)
        quality.update(val_codebook_usage=float(usage), val_codebook_perplexity=float(perplexity))
    return quality, recons


def reconstruction_grid(originals: np.ndarray, recons: torch.Tensor):
    """original | reconstruction pairs, ``PAIRS_PER_ROW`` pairs per row."""
    tiles = []
    for original, recon in zip(originals[:GRID_PAIRS], recons[:GRID_PAIRS]):
        tiles.append(original.transpose(1, 2, 0))
        tiles.append(((recon + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    return image_grid(tiles, nrow=2 * PAIRS_PER_ROW)


def _training_sample(storage: Storage, shards: list[str], image_key: str, n: int, seed: int,
                     size: int) -> np.ndarray:
    """About ``n`` training images from shards taken in a seeded random order (shards written from
    a class-sorted folder hold few classes each, so the first shards alone would be biased)."""
    order = np.random.default_rng(seed).permutation(len(shards))
    images, _, _ = read_image_shards(storage, [shards[i] for i in order], image_key, limit=n, size=size)
    return images


def run(cfg: AutoencoderConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    shard = inputs["shard"]
    info = shard.info
    check_lpips_file(cfg.lpips_weights)
    if cfg.lpips_weights is None:
        log.info("autoencoder: LPIPS off (lpips_weights: null); training on %s + %s%s", cfg.reconstruction_loss,
                 "KL" if cfg.regularizer == "kl" else "VQ", " + GAN" if cfg.disc_start is not None else "")
    if cfg.disc_start is not None and cfg.train.zero_stage == 3:
        raise ValueError("autoencoder: the discriminator (disc_start) needs train.zero_stage 0-2")
    if cfg.train.ema_decay ** cfg.train.max_steps > 0.05:
        log.warning("autoencoder: ema_decay %.4g over %d steps keeps %.0f%% of the initial weights in the "
                    "exported EMA weights; lower train.ema_decay", cfg.train.ema_decay, cfg.train.max_steps,
                    100 * cfg.train.ema_decay ** cfg.train.max_steps)
    model = build_step_autoencoder(cfg, info)  # trained in the workers; the export is loaded into it below
    model_kwargs = model.arguments
    size = base_size(cfg, info)
    image_key, train_shards, val_shards = info["image_format"], info["train_shards"], info["val_shards"]
    if not train_shards or not val_shards:
        raise ValueError(f"autoencoder: the shard step wrote {len(train_shards)} train and {len(val_shards)} "
                         "val shards; both are needed (val_fraction > 0)")

    task = AutoencoderTask(cfg, model_kwargs, shard, size)
    started = time.perf_counter()
    result = fit(task, cfg.train, ctx, name="autoencoder")
    train_wall_s = time.perf_counter() - started

    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(result.export_dir / AE_WEIGHTS)))
    model.eval()
    storage = shard.storage()
    scale_images = _training_sample(storage, train_shards, image_key, cfg.scale_estimate_samples, cfg.train.seed,
                                    size)
    scale_factor = estimate_scale_factor(model, scale_images, cfg.train.seed)
    val_images, _, _ = read_image_shards(storage, val_shards, image_key, limit=cfg.val_samples, size=size)
    quality, recons = reconstruction_metrics(model, val_images)
    if not math.isfinite(scale_factor) or scale_factor <= 0:
        raise ValueError(f"autoencoder: latent scale factor {scale_factor} is not a positive number")

    f = model.downsample_factor
    meta = {
        "preset": cfg.preset, "regularizer": cfg.regularizer, "model": model_kwargs, "downsample_factor": f,
        "latent_channels": model.latent_channels,
        "latent_shape": [model.latent_channels, size // f, size // f],
        "image_size": size, "shard_image_size": int(info["image_size"]), "channels": info["channels"], "image_format": image_key,
        "scale_factor": scale_factor, "scale_from": "sample" if cfg.regularizer == "kl" else "pre_quantization",
        "classes": info.get("classes"),
    }
    written = result.upload_to(ctx.output)
    if written != [AE_WEIGHTS]:
        raise RuntimeError(f"autoencoder export wrote {written}, expected [{AE_WEIGHTS!r}]")
    ctx.output.write_text(AE_META, json.dumps(meta, indent=2, sort_keys=True))
    grid = reconstruction_grid(val_images, recons)
    ctx.output.write_bytes(RECONSTRUCTIONS, png_bytes(grid))
    ctx.tracker.log_image(grid, RECONSTRUCTIONS)
    ctx.tracker.log_image(grid, key="reconstructions", step=cfg.train.max_steps)  # the run page's Images view
    ctx.tracker.log_dict(meta, AE_META)

    final = result.metrics
    metrics = {**quality, "scale_factor": scale_factor, "train_loss": final.get("loss", float("nan")),
               "rec_loss": final.get("rec_loss", float("nan")),
               "images_per_s": final.get("images_per_s", float("nan")),
               "train_wall_s": train_wall_s, **result.run_metrics()}
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("train_loss", "rec_loss", "images_per_s")},
                            step=cfg.train.max_steps)
    log.info("autoencoder: %d steps in %.0f s, val PSNR %.2f dB, scale factor %.4f%s", metrics["steps"],
             train_wall_s, quality["val_psnr"], scale_factor,
             f", codebook usage {quality['val_codebook_usage']:.0%} (perplexity "
             f"{quality['val_codebook_perplexity']:.1f})" if cfg.regularizer == "vq" else "")
    return StepOutput(files=[AE_WEIGHTS, AE_META, RECONSTRUCTIONS], metrics=metrics, info=dict(meta))
