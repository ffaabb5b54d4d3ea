"""ControlNet step: train a ControlNet branch (PixArt-delta) over the dit step's frozen DiT, export it,
draw a control | samples grid.

Inputs: ``shard`` (the training images, from which the control signal is made in the stream),
``autoencoder`` (frozen: encodes image and control in every batch, decodes the grid) and ``dit``
(the frozen DiT; class-conditional only).

Outputs: ``controlnet.safetensors`` (EMA weights of the branch), ``controlnet_raw.safetensors``,
``controlnet.json`` (``components.controlnet.load``) and ``controlnet_samples.png`` (a row per
validation image: its control, then ``grid_per_control`` samples of its class under that control).
"""

from __future__ import annotations

import logging
import time

from components.common.step import Manifest, StepContext, StepOutput
from components.controlnet.config import ControlNetConfig
from components.controlnet.load import CONTROLNET_META, dit_weights_digest, load_controlnet
from components.controlnet.task import SAMPLES_SERIES, ControlNetTask

CODE_VERSION = "1"
GRID = "controlnet_samples.png"

log = logging.getLogger(__name__)

# The task class run() trains, looked up on the driver: the seam for tests that need a worker to
# fail (tests/crash_hooks.py stands a subclass in), as in components/dit/train.py.
TASK_CLASSES: dict[str, type[ControlNetTask]] = {"controlnet": ControlNetTask}

# The DiT's facts the branch trains and samples with, copied into controlnet.json
DIT_FACTS = ("schedule", "num_timesteps", "prediction", "learn_sigma", "num_classes", "null_label", "latent_shape",
             "classes", "image_channels", "image_size")


def checked_dit_meta(dit_meta: "DitMeta", cfg: ControlNetConfig) -> "DitMeta":
    """The DiT's meta, refused (naming why) when ControlNet cannot take it."""
    if dit_meta.uses_text or dit_meta.null_label is None:
        raise ValueError("controlnet: the dit step's DiT is text-conditioned (dit.conditioning: text); ControlNet "
                         "takes class-conditional DiTs only for now")
    depth = int(dit_meta.model["depth"])
    if cfg.num_blocks > depth:
        raise ValueError(f"controlnet.num_blocks is {cfg.num_blocks}, but the DiT has {depth} blocks")
    return dit_meta


def step_meta(cfg: ControlNetConfig, dit_manifest: Manifest, dit_meta: "DitMeta") -> dict:
    """controlnet.json: the control signal and its settings, the branch's size, and the DiT's facts."""
    meta = {key: getattr(dit_meta, key) for key in DIT_FACTS}  # fields dit.json always has
    meta |= {"control": cfg.control, "num_blocks": cfg.num_blocks, "control_scale": cfg.control_scale,
             "dit_weights_sha256": dit_weights_digest(dit_manifest), "dit_step": dit_manifest.step,
             "sampling": cfg.sample.model_dump(), "max_steps": cfg.train.max_steps, "ema_decay": cfg.train.ema_decay}
    meta |= {"edges": {"edge_threshold": cfg.edge_threshold}, "blur": {"blur_sigma": cfg.blur_sigma},
             "low_res": {"low_res_size": cfg.low_res_size}, "folder": {"folder": cfg.folder}}[cfg.control]
    return meta


def run(cfg: ControlNetConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    from components.autoencoder.load import load_autoencoder
    from components.common.tracking import png_bytes
    from components.common.trainer import fit
    from components.controlnet.sample import control_grid
    from components.dit.load import load_dit_meta

    shard, ae_manifest, dit_manifest = inputs["shard"], inputs["autoencoder"], inputs["dit"]
    if not shard.info.get("val_shards"):
        raise ValueError(f"{ctx.step}: the shard step wrote no val shards; the grid draws their controls")
    dit_meta = checked_dit_meta(load_dit_meta(dit_manifest), cfg)
    meta = step_meta(cfg, dit_manifest, dit_meta)
    task = TASK_CLASSES["controlnet"](cfg, meta, dit=dit_manifest, autoencoder=ae_manifest, shard=shard)
    probe = task.build_model()
    meta["parameters"] = task.meta["parameters"] = sum(p.numel() for p in probe.parameters())
    meta["dit_parameters"] = task.meta["dit_parameters"] = sum(p.numel() for p in probe.dit.parameters())
    del probe
    ctx.tracker.log_dict(meta, CONTROLNET_META)

    result = fit(task, cfg.train, ctx)
    files = result.upload_to(ctx.output)

    started = time.perf_counter()
    model, meta, _ = load_controlnet(ctx.output, dit_manifest)
    task.set_models(ae=load_autoencoder(ae_manifest))
    controls, images = task.samples(model)
    grid = control_grid(controls, images, cfg.grid_per_control)
    ctx.output.write_bytes(GRID, png_bytes(grid))
    ctx.tracker.log_image(grid, GRID)
    ctx.tracker.log_image(grid, key=SAMPLES_SERIES, step=cfg.train.max_steps)
    sample_seconds = time.perf_counter() - started

    final = result.metrics
    metrics = {"loss": float(final.get("loss", float("nan"))), "mse": float(final.get("mse", float("nan"))),
               "images_per_s": float(final.get("images_per_s", float("nan"))),
               "trainable_parameters": float(meta.parameters), **result.run_metrics(),
               "grid_sample_seconds": sample_seconds}
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("loss", "mse", "images_per_s")},
                            step=int(metrics["steps"]))
    log.info("%s: %s control, %d of %d blocks copied, %d steps, loss %.4f", ctx.step, cfg.control, cfg.num_blocks,
             int(dit_meta.model["depth"]), metrics["steps"], metrics["loss"])
    return StepOutput(files=files + [GRID], metrics=metrics, info={**meta.to_json(), "checkpoint_uri": result.checkpoint_uri})
