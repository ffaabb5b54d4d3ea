"""DiT step: train a class-conditional latent DiT on the shared trainer, export it, sample a grid.

Inputs: ``shard`` (classes, image shape; the images themselves when ``data: pixels``),
``autoencoder`` (frozen; decodes the grid, and encodes every batch when ``data: pixels``) and
``latents`` (the pre-extracted training latents, absent when ``data: pixels``).

Training (``components.dit.task``): t uniform on [0, T), noise and t from the trainer's per-(step, rank)
generator; L_simple on the configured prediction (eps / v / x0), L_hybrid when ``learn_sigma``;
label dropout (``class_dropout_prob``) inside the model trains the unconditional branch that
classifier-free guidance needs. With ``data: latents`` each worker streams its share of the latent
shards (``components.common.stream``); with ``data: pixels`` it streams the shard images instead
and encodes every batch with the frozen autoencoder inside the loss: the slower mode that
``benchmarks/latents_vs_pixels.py`` measures.

Outputs: ``dit.safetensors`` (EMA weights), ``dit_raw.safetensors`` (online weights), ``dit.json``
(see ``components.dit.load``) and ``samples.png`` (rows: classes, ``grid_per_label`` columns, drawn
with the ``sample`` settings through ``components.dit.generate``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING


from components.common.model_args import with_data_fixed
from components.common.step import Manifest, StepContext, StepOutput
from components.dit.config import DitConfig
from components.dit.load import DIT_META, DIT_WEIGHTS, DitMeta, load_dit
from components.dit.task import SAMPLES_SERIES, DitTask, LatentDitTask, PixelDitTask, grid_conditions
from components.dit.text_setup import prepare_text

if TYPE_CHECKING:
    from components.autoencoder.load import AutoencoderMeta
    from components.dit.model import DiT

CODE_VERSION = "1"
SAMPLES = "samples.png"

log = logging.getLogger(__name__)


# The task class run() trains, by ``dit.data``; looked up when the step builds its task, on the driver.
# The seam for tests that need a worker to fail (tests/crash_hooks.py stands a subclass in): the task
# reaches the Ray Train workers pickled, subclass and all, so no test switch lives in the stage.
TASK_CLASSES: dict[str, type[DitTask]] = {"latents": LatentDitTask, "pixels": PixelDitTask}


def build_step_dit(cfg: DitConfig, latent_shape, num_classes: int | None, text_arguments: dict | None = None) -> "DiT":
    """The step's DiT through ``build_dit``: preset <- data shapes and step settings <- cfg.model; its
    ``arguments`` are what dit.json records and what the task rebuilds it from in each worker."""
    from components.dit.model import DIT_PRESETS, build_dit

    if cfg.preset not in DIT_PRESETS:
        raise ValueError(f"dit.preset: unknown DiT preset {cfg.preset!r}; valid presets: {', '.join(DIT_PRESETS)}")
    channels, height, width = (int(s) for s in latent_shape)
    if height != width:
        raise ValueError(f"the DiT needs square latents, got {channels}x{height}x{width}")
    fixed = with_data_fixed("dit", cfg.model, {"input_size": height, "in_channels": channels,
                                               "num_classes": num_classes})
    overrides = {**fixed, "learn_sigma": cfg.learn_sigma, "class_dropout_prob": cfg.class_dropout_prob,
                 **(text_arguments or {}), **cfg.model}
    try:
        return build_dit(cfg.preset, **overrides)
    except TypeError as e:  # an argument DiT does not take
        raise ValueError(f"dit.model: {e}") from e


def step_meta(cfg: DitConfig, probe, num_classes: int, latent_shape, classes, ae_meta: "AutoencoderMeta", text,
              warm: dict | None = None) -> DitMeta:
    """dit.json: everything needed to rebuild and sample the model (text entries only for a text DiT,
    so a class-conditional dit.json reads as before; the warm start's entries only after one)."""
    from components.dit.model import dit_flops_per_image

    text_fields = {}
    if text:
        text_fields = dict(conditioning=cfg.conditioning, text=cfg.text.model_dump(mode="json"),
                           text_vocabulary=text.vocabulary, grid_prompts=text.grid_prompts,
                           grid_labels=text.grid_labels,  # class+text only: each grid prompt's own label
                           text_encoder_files=text.encoder_files)  # None (not written): a joint encoder
    return DitMeta(
        preset=cfg.preset, model=probe.arguments, schedule=cfg.schedule, num_timesteps=cfg.num_timesteps,
        prediction=cfg.prediction, learn_sigma=cfg.learn_sigma, num_classes=num_classes,
        null_label=probe.null_class_id, latent_shape=latent_shape, classes=classes,
        image_channels=int(ae_meta.channels), image_size=int(ae_meta.image_size),
        flops_per_image=dit_flops_per_image(probe, context_tokens=cfg.text.max_tokens if text else 0),
        parameters=sum(p.numel() for p in probe.parameters()),
        data=cfg.data, max_steps=cfg.train.max_steps, ema_decay=cfg.train.ema_decay,
        sampling=cfg.sample.model_dump(),  # the step's sampler settings: defaults for later sampling
        **text_fields, **(warm or {}))


def step_grid(cfg: DitConfig, dit, meta: DitMeta, ae, ae_meta: "AutoencoderMeta", num_classes: int, text):
    """The step's final grid: (images, row of each image): a row per class, or per prompt with text."""
    from components.dit.generate import generate

    labels, prompts, rows = grid_conditions(cfg, num_classes, text.grid_prompts if text else None,
                                            text.grid_labels if text else None)
    return generate(dit, meta, ae, ae_meta, labels, cfg.sample, prompts=prompts), rows


def run(cfg: DitConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    from components.autoencoder.load import load_autoencoder
    from components.common.tracking import png_bytes
    from components.common.trainer import fit
    from components.common.images import class_grid

    shard, ae_manifest = inputs["shard"], inputs["autoencoder"]
    ae, ae_meta = load_autoencoder(ae_manifest)
    if cfg.data == "latents":
        if "latents" not in inputs:
            raise ValueError("dit.data is 'latents' but the step has no 'latents' input; "
                             "add the latents section or set dit.data: pixels")
        latents = inputs["latents"]
        latent_shape, classes = list(latents.info["latent_shape"]), latents.info.get("classes")
        if list(ae_meta.latent_shape) != latent_shape:
            raise ValueError(f"latents step shape {latent_shape} != autoencoder latent shape {ae_meta.latent_shape}")
    else:
        latents, latent_shape, classes = None, list(ae_meta.latent_shape), shard.info.get("classes")
    num_classes = len(classes) if classes else 1
    text = prepare_text(cfg, latents) if cfg.uses_text else None
    probe = build_step_dit(cfg, latent_shape, num_classes if cfg.uses_classes else None,
                           text.arguments if text else None)
    model_kwargs = probe.arguments
    if cfg.train.ema_decay ** cfg.train.max_steps > 0.01:
        # The EMA starts from the initial weights and has no warm-up: they must have decayed away.
        log.warning("dit: ema_decay %.4g over %d steps keeps %.0f%% of the initial weights in the exported "
                    "EMA weights (used for sampling); lower train.ema_decay", cfg.train.ema_decay,
                    cfg.train.max_steps, 100 * cfg.train.ema_decay ** cfg.train.max_steps)
    from components.common.warm_start import warm_start_source

    init, warm = warm_start_source(ctx.tracker.tracking_uri if ctx.tracker.enabled else None, cfg.warm_start,
                                   DIT_WEIGHTS)
    meta = step_meta(cfg, probe, num_classes, latent_shape, classes, ae_meta, text, warm)
    del probe
    if warm:
        ctx.tracker.set_tags({f"latentflow.{k}": v for k, v in warm.items()})
    # the task travels to the workers with the file's form
    task_args = dict(cfg=cfg, model_kwargs=model_kwargs, meta=meta.to_json(), latents=latents, autoencoder=ae_manifest,
                     init=init, tokenizer_json=text.tokenizer_json if text else None)
    task = TASK_CLASSES[cfg.data](**task_args, **({"shard": shard} if cfg.data == "pixels" else {}))
    ctx.tracker.log_dict(meta.to_json(), DIT_META)

    result = fit(task, cfg.train, ctx)
    files = result.upload_to(ctx.output)

    started = time.perf_counter()
    dit, meta = load_dit(ctx.output)
    images, grid_rows = step_grid(cfg, dit, meta, ae, ae_meta, num_classes, text)
    grid = class_grid(images, grid_rows, cfg.grid_per_label)
    labels = grid_rows
    ctx.output.write_bytes(SAMPLES, png_bytes(grid))
    ctx.tracker.log_image(grid, SAMPLES)
    ctx.tracker.log_image(grid, key=SAMPLES_SERIES, step=cfg.train.max_steps)
    sample_seconds = time.perf_counter() - started

    final = result.metrics
    images_per_s = float(final.get("images_per_s", float("nan")))
    metrics = {
        "loss": float(final.get("loss", float("nan"))), "mse": float(final.get("mse", float("nan"))),
        "images_per_s": images_per_s, "model_flops_per_image": float(meta.flops_per_image),
        # training ~ 3x the forward matmuls
        "train_gflops_per_s": images_per_s * 3 * meta.flops_per_image / 1e9,
        **result.run_metrics(), "grid_sample_seconds": sample_seconds,
    }
    if cfg.learn_sigma:
        metrics["vlb"] = float(final.get("vlb", float("nan")))
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("loss", "mse", "vlb", "images_per_s")},
                            step=int(metrics["steps"]))
    log.info("dit: %d steps, loss %.4f, %.0f images/s, grid of %d in %.1f s", metrics["steps"], metrics["loss"],
             images_per_s, len(labels), sample_seconds)
    info = {**meta.to_json(), "checkpoint_uri": result.checkpoint_uri}
    return StepOutput(files=files + [SAMPLES], metrics=metrics, info=info)
