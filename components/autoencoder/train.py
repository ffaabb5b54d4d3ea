"""Autoencoder step: train LDM's first stage, KL- or VQ-regularised (``regularizer``), on the shard
step's images.

Training (``components.autoencoder.task``): ONE DeepSpeed engine trains the autoencoder and, when
``disc_start`` is set, a patch discriminator, from one backward over the sum of their losses.

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
from typing import Any

import numpy as np
import torch

from components.autoencoder.config import AutoencoderConfig
from components.autoencoder.load import AE_META, AE_WEIGHTS, AutoencoderMeta, to_model_range
from components.autoencoder.lpips import check_lpips_file
from components.autoencoder.model import (AUTOENCODER_PRESETS, AutoencoderKL, AutoencoderVQ,
                                          build_autoencoder)
from components.autoencoder.quantize import code_statistics
from components.autoencoder.task import AutoencoderTask
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

# The task class run() trains (KL and VQ alike); looked up when the step builds its task, on the driver. The seam for
# tests that need a worker to fail (tests/crash_hooks.py stands a subclass in): the task reaches the
# Ray Train workers pickled, subclass and all, so no test switch lives in the stage.
TASK_CLASSES: dict[str, type[AutoencoderTask]] = {"autoencoder": AutoencoderTask}


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

    task = TASK_CLASSES["autoencoder"](cfg, model_kwargs, shard, size)
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
    meta = AutoencoderMeta(
        preset=cfg.preset, regularizer=cfg.regularizer, model=model_kwargs, downsample_factor=f,
        latent_channels=model.latent_channels, latent_shape=[model.latent_channels, size // f, size // f],
        image_size=size, shard_image_size=int(info["image_size"]), channels=info["channels"], image_format=image_key,
        scale_factor=scale_factor, scale_from="sample" if cfg.regularizer == "kl" else "pre_quantization",
        classes=info.get("classes"),
    )
    written = result.upload_to(ctx.output)
    if written != [AE_WEIGHTS]:
        raise RuntimeError(f"autoencoder export wrote {written}, expected [{AE_WEIGHTS!r}]")
    ctx.output.write_text(AE_META, json.dumps(meta.to_json(), indent=2, sort_keys=True))
    grid = reconstruction_grid(val_images, recons)
    ctx.output.write_bytes(RECONSTRUCTIONS, png_bytes(grid))
    ctx.tracker.log_image(grid, RECONSTRUCTIONS)
    ctx.tracker.log_image(grid, key="reconstructions", step=cfg.train.max_steps)  # the run page's Images view
    ctx.tracker.log_dict(meta.to_json(), AE_META)

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
    return StepOutput(files=[AE_WEIGHTS, AE_META, RECONSTRUCTIONS], metrics=metrics, info=meta.to_json())
