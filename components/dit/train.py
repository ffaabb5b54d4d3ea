"""DiT step: train a class-conditional latent DiT on the shared trainer, export it, sample a grid.

Inputs: ``shard`` (classes, image shape; the images themselves when ``data: pixels``),
``autoencoder`` (frozen; decodes the grid, and encodes every batch when ``data: pixels``) and
``latents`` (the pre-extracted training latents, absent when ``data: pixels``).

Training (``DitTask``): t uniform on [0, T), noise and t from the trainer's per-(step, rank)
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.common.model_args import with_data_fixed
from components.common.step import Manifest, StepContext, StepOutput
from components.dit.config import DitConfig
from components.dit.load import DIT_META, DIT_RAW_WEIGHTS, DIT_WEIGHTS, load_dit

if TYPE_CHECKING:
    from PIL import Image

    from components.dit.model import DiT

CODE_VERSION = "1"
SAMPLES = "samples.png"
SAMPLES_SERIES = "samples"  # the grid as an MLflow image series: one per checkpoint, and the final one

log = logging.getLogger(__name__)


class DitTask:
    """What the trainer trains: the DiT, its loss and export. The subclasses say where batches come
    from: ``{"latent", "label"}`` (used as x_0) or ``{"image", "label"}`` (encoded first)."""

    def __init__(self, cfg: DitConfig, model_kwargs: dict[str, Any], meta: dict[str, Any],
                 latents: Manifest | None = None, autoencoder: Manifest | None = None,
                 in_memory: tuple[torch.Tensor, torch.Tensor] | None = None, init: tuple[str, str] | None = None):
        self.cfg, self.model_kwargs, self.meta = cfg, dict(model_kwargs), dict(meta)
        self.init = init  # (directory URI, weights file) of a warm start
        self.latents_manifest, self.autoencoder_manifest = latents, autoencoder
        self.in_memory = in_memory  # (latents, labels): tests and benchmarks, instead of a manifest
        self._schedule = self._data = self._ae = None

    def __getstate__(self):  # what travels to workers: configs and manifests, no loaded models
        return {**self.__dict__, "_schedule": None, "_data": None, "_ae": None}

    @property
    def schedule(self):
        from components.diffusion import NoiseSchedule

        if self._schedule is None:
            self._schedule = NoiseSchedule.from_name(self.cfg.schedule, self.cfg.num_timesteps)
        return self._schedule

    def build_model(self) -> torch.nn.Module:
        from components.common.warm_start import load_into
        from components.dit.model import DiT

        return load_into(DiT(**self.model_kwargs), self.init)

    def set_autoencoder(self, model: torch.nn.Module, meta: dict) -> None:
        """Use an already loaded autoencoder for ``data: pixels`` (benchmarks); else it is loaded
        from the manifest in each worker on first use."""
        self._ae = (model.eval().requires_grad_(False), meta)

    def clean_latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_0 of the batch, float32: the stored latents, or the images encoded now."""
        if "latent" in batch:
            return batch["latent"].float()
        from components.autoencoder.load import encode_scaled, load_autoencoder

        if self._ae is None:
            self.set_autoencoder(*load_autoencoder(self.autoencoder_manifest))
        model, meta = self._ae
        images = batch["image"]
        model.to(images.device)
        with torch.no_grad():
            return encode_scaled(model, meta, images.float()).float()

    def loss(self, model, batch, step, generator):
        from components.diffusion import training_losses

        x0 = self.clean_latents(batch)                                           # (N, c, h, w)
        y = batch["label"].long().clamp(min=0)  # unlabelled samples (-1) are class 0 of 1
        dtype = next(v for v in batch.values() if v.is_floating_point()).dtype  # the compute dtype
        n, device = x0.shape[0], x0.device
        t = torch.randint(0, self.cfg.num_timesteps, (n,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        # Label dropout for classifier-free guidance, drawn here rather than inside the model so that
        # every random choice of a step comes from the (seed, step, rank) generator: a resumed run
        # repeats the steps of an uninterrupted one exactly.
        drop = (torch.rand(n, generator=generator, device=device) < self.cfg.class_dropout_prob).long()

        def model_fn(x, tt, y):  # the diffusion arithmetic stays fp32; the model runs in the compute dtype
            return model(x.to(dtype), tt, y, force_drop_ids=drop).float()

        terms = training_losses(self.schedule, model_fn, x0, t, noise, prediction=self.cfg.prediction,
                                learned_variance=self.cfg.learn_sigma, vlb_weight=self.cfg.vlb_weight,
                                model_kwargs={"y": y})
        extras = {"mse": float(terms["mse"].detach().mean())}
        if self.cfg.learn_sigma:
            extras["vlb"] = float(terms["vlb"].detach().mean())
        return terms["loss"].mean(), extras

    def export(self, model, ema_model, out_dir: Path) -> None:
        from components.common.task_parts import export_weights

        export_weights(model, ema_model, out_dir, DIT_WEIGHTS, DIT_RAW_WEIGHTS, DIT_META, self.meta)

    def preview(self, ema) -> tuple[str, "Image.Image"] | None:
        """The step's sample grid drawn with the EMA weights so far (the trainer's checkpoint hook)."""
        from components.autoencoder.load import load_autoencoder
        from components.dit.generate import class_grid, generate
        from components.dit.model import DiT

        if self.autoencoder_manifest is None and self._ae is None:
            return None
        if self._ae is None:
            self.set_autoencoder(*load_autoencoder(self.autoencoder_manifest))
        ae, ae_meta = self._ae
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a Ray GPU worker sees its own GPU as cuda:0
        dit = ema.copy_to(DiT(**self.model_kwargs)).to(device).eval()
        labels = grid_labels(int(self.meta["num_classes"]), self.cfg.grid_classes, self.cfg.grid_per_label)
        images = generate(dit, self.meta, ae.to(device), ae_meta, labels, self.cfg.sample)
        return SAMPLES_SERIES, class_grid(images, labels, self.cfg.grid_per_label)


class LatentDitTask(DitTask):
    """``data: latents``: each worker streams its share of the latents step's training latents."""

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.common.task_parts import latent_source

        return latent_source(self.latents_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch)


class PixelDitTask(DitTask):
    """``data: pixels``: each worker streams the shard images (at the base size) and encodes every
    batch with the frozen autoencoder inside the loss."""

    def __init__(self, *args, shard: Manifest | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard_manifest = shard

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.autoencoder.load import to_model_range
        from components.common.task_parts import ConvertImages, image_source

        return image_source(self.shard_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch,
                            size=int(self.meta["image_size"]), transform=ConvertImages(to_model_range))


# The task class run() trains, by ``dit.data``; looked up when the step builds its task, on the driver.
# The seam for tests that need a worker to fail (tests/crash_hooks.py stands a subclass in): the task
# reaches the Ray Train workers pickled, subclass and all, so no test switch lives in the stage.
TASK_CLASSES: dict[str, type[DitTask]] = {"latents": LatentDitTask, "pixels": PixelDitTask}


def build_step_dit(cfg: DitConfig, latent_shape, num_classes: int) -> "DiT":
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
    overrides = {**fixed, "learn_sigma": cfg.learn_sigma, "class_dropout_prob": cfg.class_dropout_prob, **cfg.model}
    try:
        return build_dit(cfg.preset, **overrides)
    except TypeError as e:  # an argument DiT does not take
        raise ValueError(f"dit.model: {e}") from e


def grid_labels(num_classes: int, rows: int, per_label: int) -> list[int]:
    """``rows`` classes evenly spaced over all (all when fewer), each repeated ``per_label`` times."""
    rows = min(rows, num_classes)
    chosen = sorted({round(i * (num_classes - 1) / max(rows - 1, 1)) for i in range(rows)})
    return [label for label in chosen for _ in range(per_label)]


def run(cfg: DitConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    from components.autoencoder.load import load_autoencoder
    from components.common.tracking import png_bytes
    from components.common.trainer import fit
    from components.dit.generate import class_grid, generate
    from components.dit.model import dit_flops_per_image

    shard, ae_manifest = inputs["shard"], inputs["autoencoder"]
    ae, ae_meta = load_autoencoder(ae_manifest)
    if cfg.data == "latents":
        if "latents" not in inputs:
            raise ValueError("dit.data is 'latents' but the step has no 'latents' input; "
                             "add the latents section or set dit.data: pixels")
        latents = inputs["latents"]
        latent_shape, classes = list(latents.info["latent_shape"]), latents.info.get("classes")
        if list(ae_meta["latent_shape"]) != latent_shape:
            raise ValueError(f"latents step shape {latent_shape} != autoencoder latent shape {ae_meta['latent_shape']}")
    else:
        latents, latent_shape, classes = None, list(ae_meta["latent_shape"]), shard.info.get("classes")
    num_classes = len(classes) if classes else 1
    probe = build_step_dit(cfg, latent_shape, num_classes)
    model_kwargs = probe.arguments
    meta = {
        "preset": cfg.preset, "model": model_kwargs, "schedule": cfg.schedule, "num_timesteps": cfg.num_timesteps,
        "prediction": cfg.prediction, "learn_sigma": cfg.learn_sigma, "num_classes": num_classes,
        "null_label": probe.null_class_id, "latent_shape": latent_shape, "classes": classes,
        "image_channels": int(ae_meta["channels"]), "image_size": int(ae_meta["image_size"]),
        "flops_per_image": dit_flops_per_image(probe), "parameters": sum(p.numel() for p in probe.parameters()),
        "data": cfg.data, "max_steps": cfg.train.max_steps, "ema_decay": cfg.train.ema_decay,
        "sampling": cfg.sample.model_dump(),  # the step's sampler settings: defaults for later sampling
    }
    del probe
    if cfg.train.ema_decay ** cfg.train.max_steps > 0.01:
        # The EMA starts from the initial weights and has no warm-up: they must have decayed away.
        log.warning("dit: ema_decay %.4g over %d steps keeps %.0f%% of the initial weights in the exported "
                    "EMA weights (used for sampling); lower train.ema_decay", cfg.train.ema_decay,
                    cfg.train.max_steps, 100 * cfg.train.ema_decay ** cfg.train.max_steps)
    from components.common.warm_start import warm_start_source

    init, warm = warm_start_source(ctx.tracker.tracking_uri if ctx.tracker.enabled else None, cfg.warm_start,
                                   DIT_WEIGHTS)
    meta.update(warm)
    if warm:
        ctx.tracker.set_tags({f"latentflow.{k}": v for k, v in warm.items()})
    task_args = dict(cfg=cfg, model_kwargs=model_kwargs, meta=meta, latents=latents, autoencoder=ae_manifest,
                     init=init)
    task = TASK_CLASSES[cfg.data](**task_args, **({"shard": shard} if cfg.data == "pixels" else {}))
    ctx.tracker.log_dict(meta, DIT_META)

    result = fit(task, cfg.train, ctx)
    files = result.upload_to(ctx.output)

    started = time.perf_counter()
    dit, meta = load_dit(ctx.output)
    labels = grid_labels(num_classes, cfg.grid_classes, cfg.grid_per_label)
    images = generate(dit, meta, ae, ae_meta, labels, cfg.sample)
    grid = class_grid(images, labels, cfg.grid_per_label)
    ctx.output.write_bytes(SAMPLES, png_bytes(grid))
    ctx.tracker.log_image(grid, SAMPLES)
    ctx.tracker.log_image(grid, key=SAMPLES_SERIES, step=cfg.train.max_steps)
    sample_seconds = time.perf_counter() - started

    final = result.metrics
    images_per_s = float(final.get("images_per_s", float("nan")))
    metrics = {
        "loss": float(final.get("loss", float("nan"))), "mse": float(final.get("mse", float("nan"))),
        "images_per_s": images_per_s, "model_flops_per_image": float(meta["flops_per_image"]),
        # training ~ 3x the forward matmuls
        "train_gflops_per_s": images_per_s * 3 * meta["flops_per_image"] / 1e9,
        **result.run_metrics(), "grid_sample_seconds": sample_seconds,
    }
    if cfg.learn_sigma:
        metrics["vlb"] = float(final.get("vlb", float("nan")))
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("loss", "mse", "vlb", "images_per_s")},
                            step=int(metrics["steps"]))
    log.info("dit: %d steps, loss %.4f, %.0f images/s, grid of %d in %.1f s", metrics["steps"], metrics["loss"],
             images_per_s, len(labels), sample_seconds)
    info = {**meta, "checkpoint_uri": result.checkpoint_uri}
    return StepOutput(files=files + [SAMPLES], metrics=metrics, info=info)
