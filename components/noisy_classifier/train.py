"""noisy_classifier step: train f(y | x_t, t) on the latents step's latents for classifier guidance.

Training (``NoisyClassifierTask``, on the shared trainer): t uniform on [0, T), x_t = q(x_t | x_0)
with the DiT's schedule, cross-entropy on the label. It needs only the latents, so on a cluster it
trains beside the DiT. After training, the EMA classifier is scored on the validation latents at
``t_buckets`` equal ranges of t (accuracy falls toward chance as t -> T: there is little left to
classify), logged as ``val_accuracy_t<lo>_<hi>`` and as a chart.

Outputs: ``noisy_classifier.safetensors`` (EMA), ``noisy_classifier_raw.safetensors``,
``noisy_classifier.json`` (model arguments, schedule, classes; see ``components.noisy_classifier.load``) and
``accuracy_by_t.png``.
"""

from __future__ import annotations

import logging

import torch

from components.common.model_args import with_data_fixed
from components.common.step import Manifest, StepContext, StepOutput
from components.noisy_classifier.config import NoisyClassifierConfig
from components.noisy_classifier.load import META, NoisyClassifierMeta, load_noisy_classifier
from components.noisy_classifier.task import NoisyClassifierTask

CODE_VERSION = "1"
CHART = "accuracy_by_t.png"

log = logging.getLogger(__name__)

# The task class run() trains; looked up when the step builds its task, on the driver. The seam for
# tests that need a worker to fail (tests/crash_hooks.py stands a subclass in): the task reaches the
# Ray Train workers pickled, subclass and all, so no test switch lives in the stage.
TASK_CLASSES: dict[str, type[NoisyClassifierTask]] = {"noisy_classifier": NoisyClassifierTask}


@torch.no_grad()
def accuracy_by_t(model: torch.nn.Module, schedule, latents: torch.Tensor, labels: torch.Tensor, buckets: int,
                  seed: int = 0, batch_size: int = 500) -> list[dict[str, float]]:
    """[{t_low, t_high, accuracy}] for ``buckets`` equal ranges of t; every latent is noised once per
    bucket at a t drawn uniformly from the range (seeded), so the buckets see the same images."""
    from components.diffusion import q_sample

    generator = torch.Generator().manual_seed(seed)
    edges = torch.linspace(0, schedule.num_timesteps, buckets + 1).long().tolist()
    rows = []
    for low, high in zip(edges, edges[1:]):
        t = torch.randint(low, high, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        correct = 0
        for start in range(0, len(latents), batch_size):
            part = slice(start, start + batch_size)
            x_t = q_sample(schedule, latents[part].float(), t[part], noise[part])
            correct += int((model(x_t, t[part]).argmax(1) == labels[part]).sum())
        rows.append({"t_low": low, "t_high": high - 1, "accuracy": correct / max(1, len(latents))})
    return rows


def run(cfg: NoisyClassifierConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    from components.common.plot import line_chart
    from components.common.tracking import png_bytes
    from components.common.trainer import fit
    from components.latents.load import load_latent_shards
    from components.noisy_classifier.model import NOISY_CLASSIFIER_PRESETS, build_noisy_classifier

    latents = inputs["latents"]
    classes = latents.info.get("classes")
    if not classes or len(classes) < 2:
        raise ValueError(f"noisy_classifier needs a labelled dataset with 2 or more classes; the latents step "
                         f"({latents.output_uri}) has classes {classes}")
    if cfg.preset not in NOISY_CLASSIFIER_PRESETS:
        raise ValueError(f"noisy_classifier.preset: unknown preset {cfg.preset!r}; valid: "
                         f"{', '.join(NOISY_CLASSIFIER_PRESETS)}")
    shape = [int(s) for s in latents.info["latent_shape"]]
    fixed = with_data_fixed("noisy_classifier", cfg.model, {"in_channels": shape[0], "num_classes": len(classes)})
    overrides = {k: v for k, v in cfg.model.items() if k not in fixed}  # the fixed ones agree (checked above)
    probe = build_noisy_classifier(cfg.preset, fixed["in_channels"], fixed["num_classes"], **overrides)
    typed = NoisyClassifierMeta(preset=cfg.preset, model=probe.arguments, schedule=cfg.schedule,
                                num_timesteps=cfg.num_timesteps, classes=list(classes), latent_shape=shape,
                                parameters=sum(p.numel() for p in probe.parameters()))
    del probe
    meta = typed.to_json()  # the task travels to the workers with the file's form
    result = fit(TASK_CLASSES["noisy_classifier"](cfg, meta, latents=latents), cfg.train, ctx)
    files = result.upload_to(ctx.output)

    model, _ = load_noisy_classifier(ctx.output)
    val_x, val_y = load_latent_shards(latents, split="val", limit=cfg.val_samples)
    task = NoisyClassifierTask(cfg, meta)
    rows = accuracy_by_t(model, task.schedule, val_x, val_y, cfg.t_buckets, seed=cfg.train.seed)
    metrics = {f"val_accuracy_t{r['t_low']}_{r['t_high']}": r["accuracy"] for r in rows}
    metrics.update({"loss": float(result.metrics.get("loss", float("nan"))),
                    "train_accuracy": float(result.metrics.get("accuracy", float("nan"))),
                    "val_samples": float(len(val_x)), **result.run_metrics()})
    chart = line_chart({"validation accuracy": [((r["t_low"] + r["t_high"]) / 2, r["accuracy"]) for r in rows]},
                       title="noisy classifier: accuracy against t", x_label="t", y_label="accuracy",
                       log2_x=False)
    ctx.output.write_bytes(CHART, png_bytes(chart))
    ctx.tracker.log_image(chart, CHART)
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_dict({"accuracy_by_t": rows, **meta}, META)
    log.info("noisy_classifier: validation accuracy by t %s", ", ".join(
        f"[{r['t_low']}, {r['t_high']}] {r['accuracy']:.3f}" for r in rows))
    return StepOutput(files=files + [CHART], metrics=metrics, info={**meta, "accuracy_by_t": rows})
