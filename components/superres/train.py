"""Super-resolution step: one stage of the cascade, trained on pairs made from the shard images.

For every batch, x = resize(image, output_size) and z = resize(x, input_size) (``filter``), z is
blurred and/or noise-augmented (``augmentation``, per example, levels given to the model), and the
U-Net learns v (or eps: ``prediction``) for x_t given z, with the mean squared error on the
stage's own noise schedule (``components.superres.task``). Through the shared trainer (Ray Train +
DeepSpeed, checkpoints, resume, EMA, MLflow).

Afterwards, on ``eval_samples`` validation images: PSNR and SSIM of the super-resolved image against
the ground truth, from the true low-resolution input and from a degraded one (blur + noise:
``degrade_*``), with the plain upsampling (``filter``) as a reference; a low | SR | truth grid.

When the shard images are smaller than ``output_size`` the targets are upsampled shard images, as
for MNIST's 28 px digits at 64 px: the stage then learns the ``filter``'s upsampling, no more.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import torch

from components.common.model_args import with_data_fixed
from components.common.step import Manifest, StepContext, StepOutput
from components.superres.config import SuperResConfig
from components.superres.load import SR_META, SR_WEIGHTS, SuperResMeta
from components.superres.task import SuperResTask, training_pair

if TYPE_CHECKING:
    from components.superres.model import EfficientUNet

CODE_VERSION = "1"
GRID = "superres_samples.png"

log = logging.getLogger(__name__)

# The task class run() trains; looked up when the step builds its task, on the driver. The seam for
# tests that need a worker to fail (tests/crash_hooks.py stands a subclass in): the task reaches the
# Ray Train workers pickled, subclass and all, so no test switch lives in the stage.
TASK_CLASSES: dict[str, type[SuperResTask]] = {"superres": SuperResTask}


def build_step_superres(cfg: SuperResConfig, channels: int, num_classes: int, pooled_dim: int = 0) -> "EfficientUNet":
    """The stage's U-Net through ``build_superres``: preset <- cfg.model <- the data's channels, the
    stage's output size and classes (and a text stage's pooled width); its ``arguments`` are what
    superres.json records."""
    from components.superres.model import SUPERRES_PRESETS, build_superres

    if cfg.preset not in SUPERRES_PRESETS:
        raise ValueError(f"superres.preset: unknown preset {cfg.preset!r}; valid: {', '.join(SUPERRES_PRESETS)}")
    fixed = with_data_fixed("superres", cfg.model, {"in_channels": channels, "out_size": cfg.output_size,
                                                    "num_classes": num_classes, "pooled_dim": pooled_dim})
    try:
        return build_superres(cfg.preset, **{**cfg.model, **fixed})
    except TypeError as e:  # an argument EfficientUNet does not take
        raise ValueError(f"superres.model: {e}") from e


def degrade(low: torch.Tensor, cfg: SuperResConfig, seed: int) -> torch.Tensor:
    """The evaluation's degraded input: blurred, then Gaussian noise, fixed by ``seed``."""
    from components.superres.augment import gaussian_blur

    x = low
    if cfg.degrade_blur_sigma > 0:
        x = gaussian_blur(x, torch.full((len(x),), cfg.degrade_blur_sigma), 5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + cfg.degrade_noise_std * noise).clamp(-1, 1)


def evaluate_stage(stage, images: torch.Tensor, labels: torch.Tensor, cfg: SuperResConfig, seed: int = 0,
                   prompts: list[str] | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR/SSIM on uint8 validation images (a text stage: with their captions, ``prompts``); returns
    (metrics, uint8 grid rows low|SR|truth)."""
    from components.common.images import to_uint8
    from components.diffusion import sample_generator
    from components.common.resample import resize
    from components.superres.quality import psnr, ssim
    from components.superres.sample import super_resolve

    high, low = training_pair(images, cfg)
    generators = [sample_generator(seed, i, 1) for i in range(len(high))]
    sr = super_resolve(stage, low, generators, labels=labels, prompts=prompts)
    generators = [sample_generator(seed, i, 2) for i in range(len(high))]
    degraded = degrade(low, cfg, seed)
    sr_degraded = super_resolve(stage, degraded, generators, labels=labels, prompts=prompts)
    upsampled = resize(low, cfg.output_size, cfg.filter)
    metrics = {
        "psnr": float(psnr(sr, high).mean()), "ssim": float(ssim(sr, high).mean()),
        "psnr_degraded_input": float(psnr(sr_degraded, high).mean()),
        "ssim_degraded_input": float(ssim(sr_degraded, high).mean()),
        f"psnr_{cfg.filter}_upsampling": float(psnr(upsampled, high).mean()),
        f"ssim_{cfg.filter}_upsampling": float(ssim(upsampled, high).mean()),
    }
    nearest = torch.nn.functional.interpolate(low, size=high.shape[-2:], mode="nearest")
    rows = torch.stack([to_uint8(nearest), to_uint8(sr), to_uint8(high)])  # (3, N, C, H, W)
    return metrics, rows


def run(cfg: SuperResConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    from components.common.images import image_grid
    from components.common.shard_reader import read_image_shards
    from components.common.tracking import png_bytes
    from components.common.trainer import fit
    from components.superres.load import load_superres

    shard = inputs["shard"]
    info = shard.info
    if not info.get("train_shards") or not info.get("val_shards"):
        raise ValueError(f"{ctx.step}: the shard step wrote no train or no val shards; both are needed")
    classes = info.get("classes")
    if cfg.class_conditional and not classes:
        raise ValueError(f"{ctx.step}: class_conditional needs a labelled dataset; the shard step has no classes")
    num_classes = len(classes) if cfg.class_conditional else 0
    channels, shard_size = int(info["channels"]), int(info["image_size"])
    if shard_size < cfg.output_size:
        log.warning("%s: the shard images are %d px, smaller than output_size %d: the targets are upsampled "
                    "(%s), so this stage can learn no detail beyond that filter", ctx.step, shard_size,
                    cfg.output_size, cfg.filter)
    from components.superres.text_model import prepare_stage_text

    text = prepare_stage_text(cfg, shard, ctx.step) if cfg.text is not None else None
    probe = build_step_superres(cfg, channels, num_classes, text.pooled_dim if text else 0)
    model_kwargs = probe.arguments
    meta = SuperResMeta(
        preset=cfg.preset, model=model_kwargs, input_size=cfg.input_size, output_size=cfg.output_size,
        channels=channels, schedule=cfg.schedule, num_timesteps=cfg.num_timesteps, filter=cfg.filter,
        num_classes=num_classes, classes=classes, prediction=cfg.prediction,
        sampling=cfg.sample.model_dump(mode="json"), augmentation=cfg.augmentation.model_dump(mode="json"),
        parameters=sum(p.numel() for p in probe.parameters()), max_steps=cfg.train.max_steps,
    )
    if text is not None:  # what load_superres rebuilds the encoder from
        # text_encoder_files stays in extra: the file has it (null for a joint encoder) whenever it has text
        meta = dataclasses.replace(meta, text=cfg.text.model_dump(mode="json"),
                                   extra={"text_encoder_files": text.encoder_files})
    del probe
    from components.common.warm_start import warm_start_source

    init, warm = warm_start_source(ctx.tracker.tracking_uri if ctx.tracker.enabled else None, cfg.warm_start,
                                   SR_WEIGHTS)
    meta = dataclasses.replace(meta, **warm)
    if warm:
        ctx.tracker.set_tags({f"latentflow.{k}": v for k, v in warm.items()})
    # the task travels to the workers with the file's form
    task = TASK_CLASSES["superres"](cfg, model_kwargs, meta.to_json(), shard=shard, init=init,
                                    tokenizer_json=text.tokenizer_json if text else None)
    ctx.tracker.log_dict(meta.to_json(), SR_META)
    started = time.perf_counter()
    result = fit(task, cfg.train, ctx, name=ctx.step)
    train_wall_s = time.perf_counter() - started
    files = result.upload_to(ctx.output)

    started = time.perf_counter()
    stage = load_superres(ctx.output)
    val_images, val_labels, _ = read_image_shards(shard.storage(), info["val_shards"], info.get("image_format", "png"),
                                                  limit=cfg.eval_samples)
    labels = torch.from_numpy(val_labels).long().clamp(min=0) if num_classes else None
    prompts = validation_captions(shard, len(val_images)) if text is not None else None
    quality, rows = evaluate_stage(stage, torch.from_numpy(val_images), labels, cfg, prompts=prompts)
    columns = min(cfg.grid_samples, rows.shape[1])
    cells = [rows[r, i].permute(1, 2, 0).numpy() for r in range(3) for i in range(columns)]
    grid = image_grid(cells, nrow=columns)
    ctx.output.write_bytes(GRID, png_bytes(grid))
    ctx.tracker.log_image(grid, GRID)
    ctx.tracker.log_image(grid, key="samples", step=cfg.train.max_steps)  # the run page's Images view

    final = result.metrics
    metrics = {**quality, "loss": float(final.get("loss", float("nan"))),
               "images_per_s": float(final.get("images_per_s", float("nan"))), "train_wall_s": train_wall_s,
               "eval_seconds": time.perf_counter() - started, **result.run_metrics()}
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("loss", "images_per_s")},
                            step=int(metrics["steps"]))
    log.info("%s: %d->%d px, %d steps, PSNR %.2f dB (degraded input %.2f, %s %.2f), SSIM %.3f", ctx.step,
             cfg.input_size, cfg.output_size, metrics["steps"], quality["psnr"], quality["psnr_degraded_input"],
             cfg.filter, quality[f"psnr_{cfg.filter}_upsampling"], quality["ssim"])
    return StepOutput(files=files + [GRID], metrics=metrics,
                      info={**meta.to_json(), "checkpoint_uri": result.checkpoint_uri,
                            "eval_count": int(len(val_images))})


def validation_captions(shard: Manifest, count: int) -> list[str]:
    """The captions of the first ``count`` validation samples, in the order ``read_image_shards`` reads them."""
    from itertools import islice

    from components.common.data import image_split, split_captions

    return list(islice(split_captions(image_split(shard, "val", captions=True)), count))
