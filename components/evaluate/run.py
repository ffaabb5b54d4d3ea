"""Evaluate step: judge the DiT's samples with a small classifier trained here on the real digits.

1. Train ``EvalClassifier`` (``cfg.classifier``) on the shard step's training split, in this
   step's own process (no Ray Train: it is small), and measure it on the validation split.
2. Generate ``samples_per_class`` images for every class with ``cfg.sample`` and classify them:
   ``sample_accuracy`` (the requested class won) overall and per class.
3. Fréchet distance between the classifier's penultimate features of the real *validation*
   images and of the generated ones (``frechet_distance``), and, for scale, the same distance
   between a random subset of the real *training* images, as many as were generated (or all of
   them when there are fewer), and the same validation images (``frechet_distance_real_baseline``).
   Both therefore compare equal counts against the same reference; the baseline is the floor a
   perfect generator would reach (slightly optimistic: the classifier has seen the training images).
4. With a distill step among the inputs: the quality-versus-cost table (teacher at
   ``teacher_steps``, the student at its own steps; ``quality_vs_steps.json`` and ``.png``, see
   ``components.evaluate.distill_table``).
5. With ``inception`` set: FID and KID of the first ``inception.samples_per_class`` samples of
   each class on Inception-v3 pool features, against the ``inception_reference`` step's real
   features (``fid``, ``kid``, ``kid_std``, and that step's ``fid_real_baseline``/``kid_real_baseline``),
   and the same at the cascade's final size (``cascade_fid``, ...). See ``components.evaluate.inception``.
6. With super-resolution stages among the inputs: the first ``cascade_samples_per_class`` samples
   of each class go on through the cascade and are scored the same way at the final size, by a
   classifier trained on the real images resized as the last stage made its targets
   (``cascade_*`` metrics, ``cascade_samples.png``; see ``components.evaluate.cascade``).
7. With a noisy_classifier step among the inputs: classifier guidance at ``guidance_comparison``'s
   weights beside classifier-free guidance (``classifier_w<w>_*``, ``cfg_w<w>_*``,
   ``guidance_comparison.json``; see ``components.evaluate.guidance_table``).

Outputs: ``classifier.safetensors`` + ``classifier.json`` (reused later: see ``load_classifier``),
``eval_samples.png`` (``grid_per_class`` samples per class, one row per class) and
``evaluation.json`` (metrics, sampler settings, counts), the last two also logged to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from components.common.step import Manifest, StepContext, StepOutput
from components.common.storage import Storage
from components.common.tracking import png_bytes
from components.dit.config import SamplingConfig
from components.dit.generate import class_grid
from components.evaluate.cascade import CASCADE_GRID, first_per_class, score_cascade, stage_names
from components.evaluate.classifier import EvalClassifier, build_classifier
from components.evaluate.config import ClassifierTrainConfig, EvaluateConfig
from components.evaluate.metrics import frechet_distance_of

CODE_VERSION = "5"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_META = "classifier.json"
SAMPLES_GRID = "eval_samples.png"
EVALUATION = "evaluation.json"
LOG_EVERY = 50

log = logging.getLogger(__name__)

__all__ = ["CODE_VERSION", "EvaluateError", "run", "read_split", "train_classifier", "classify",
           "save_classifier", "load_classifier", "to_unit_range"]


class EvaluateError(ValueError):
    """The evaluate step cannot run on these inputs; the message names the step or file at fault."""


# ---------------------------------------------------------------- real images


def read_split(shard: Manifest, split: str, size: int | None = None,
               filter: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """Every sample of one split (``train`` or ``val``) of a shard step, in shard order: uint8
    images (N, C, H, W) and int64 labels (N,), -1 where a sample has none, resized to ``size``
    with ``filter`` when given (as the autoencoder's base resolution and the SR stages' targets
    are made). Empty arrays when the split has no shards."""
    from components.common.resample import resize_uint8
    from components.common.shard_reader import read_image_shards

    rels = shard.info.get(f"{split}_shards") or []
    if not rels:
        c, size = int(shard.info.get("channels", 1)), int(size or shard.info.get("image_size", 0))
        return np.zeros((0, c, size, size), np.uint8), np.zeros((0,), np.int64)
    images, labels, _ = read_image_shards(shard.storage(), rels, shard.info.get("image_format", "png"))
    return (resize_uint8(images, size, filter) if size else images), labels


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1], the range every model here is trained in."""
    return images.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------- the classifier


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by whole pixels in [-max_shift, max_shift] per axis, edges replicated."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (N, C, H+2s, W+2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator).to(x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]  # (N, C, H, W)


def train_classifier(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int,
                     cfg: ClassifierTrainConfig, device: str = "cpu",
                     log_metrics=None) -> tuple[EvalClassifier, dict[str, float]]:
    """Train a classifier from ``cfg`` on uint8 (N, C, H, W) images; returns it in eval mode and
    {"classifier_train_loss", "classifier_train_seconds"}. Deterministic in ``cfg.seed`` on CPU.

    ``log_metrics(metrics, step)``, if given, receives the running loss every 50 steps."""
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0 or (labels < 0).any() or (labels >= num_classes).any():
        raise EvaluateError(f"classifier training needs labelled images with labels in [0, {num_classes}); "
                            f"got {len(images)} images, labels {labels.unique().tolist()[:12]}")
    t0 = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_classifier(cfg.preset, images.shape[1], num_classes).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warmup = max(1, min(50, cfg.steps // 10))

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batch_size = min(cfg.batch_size, len(images))
    order, position = torch.randperm(len(images), generator=generator), 0
    model.train()
    running = None
    for step in range(cfg.steps):
        if position + batch_size > len(order):  # a new epoch: reshuffle, drop the partial batch
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        x = random_shift(to_unit_range(images[index]), cfg.max_shift, generator).to(device)
        y = labels[index].to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        if log_metrics is not None and ((step + 1) % LOG_EVERY == 0 or step + 1 == cfg.steps):
            log_metrics({"classifier_train_loss": running}, step + 1)
    model.eval()
    return model, {"classifier_train_loss": float(running), "classifier_train_seconds": time.monotonic() - t0}


@torch.inference_mode()
def classify(model: EvalClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 500,
             device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), penultimate features (N, D)) of uint8 (N, C, H, W) images, as float64."""
    images = torch.as_tensor(images)
    device = device or next(model.parameters()).device
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(to_unit_range(images[start:start + batch_size]).to(device))  # (B, D)
        features.append(f.double().cpu())
        logits.append(model.logits(f).double().cpu())  # (B, K)
    if not logits:
        return np.zeros((0, model.logits.out_features)), np.zeros((0, model.logits.in_features))
    return torch.cat(logits).numpy(), torch.cat(features).numpy()


def save_classifier(model: EvalClassifier, meta: dict[str, Any], output: Storage) -> list[str]:
    """Write ``classifier.safetensors`` and ``classifier.json``; returns their relative paths."""
    from safetensors.torch import save_file

    scratch = Path(tempfile.mkdtemp(prefix="latentflow-classifier-"))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(scratch / CLASSIFIER_WEIGHTS), metadata={"preset": meta["preset"]})
        output.upload(CLASSIFIER_WEIGHTS, scratch / CLASSIFIER_WEIGHTS)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    output.write_text(CLASSIFIER_META, json.dumps(meta, indent=2, sort_keys=True))
    return [CLASSIFIER_WEIGHTS, CLASSIFIER_META]


def load_classifier(manifest: Manifest, device: str = "cpu") -> tuple[EvalClassifier, dict[str, Any]]:
    """The evaluate step's classifier (eval mode) and its meta: preset, in_channels, num_classes,
    classes, image_size, val_accuracy, input range ("uint8 / 127.5 - 1")."""
    from safetensors.torch import load as load_safetensors

    storage = manifest.storage()
    meta = json.loads(storage.read_text(CLASSIFIER_META))
    model = build_classifier(meta["preset"], meta["in_channels"], meta["num_classes"])
    model.load_state_dict(load_safetensors(storage.read_bytes(CLASSIFIER_WEIGHTS)))
    return model.to(device).eval(), meta


# ---------------------------------------------------------------- generation


def generate_samples(inputs: dict[str, Manifest], labels: torch.Tensor, sampling: SamplingConfig,
                     batch_size: int, device: str, classes: list[str]) -> torch.Tensor:
    """uint8 (N, C, H, W) samples of the DiT (EMA weights) decoded by the autoencoder: the one
    place the evaluate step touches the generator. Checks that the DiT knows the shard's classes."""
    from components.autoencoder.load import load_autoencoder
    from components.dit.generate import generate
    from components.dit.load import load_dit

    dit, dit_meta = load_dit(inputs["dit"], device=device, ema=True)
    dit_classes = dit_meta.get("classes") or [str(i) for i in range(int(dit_meta["num_classes"]))]
    if list(dit_classes) != list(classes):
        raise EvaluateError(f"the dit step ({inputs['dit'].location}) was trained on classes {dit_classes}, "
                            f"the shard step has {classes}")
    ae, ae_meta = load_autoencoder(inputs["autoencoder"], device=device)
    return generate(dit, dit_meta, ae, ae_meta, labels, sampling, batch_size=batch_size, progress=True)


def metric_name(class_name: str) -> str:
    return "sample_accuracy_class_" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(class_name))


# ---------------------------------------------------------------- the step


def run(cfg: EvaluateConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    torch.set_num_threads(max(1, math.ceil(ctx.resources.num_cpus)))
    device = "cuda" if ctx.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    shard = inputs["shard"]
    classes = shard.info.get("classes")
    if not classes:
        raise EvaluateError(f"evaluate needs a labelled dataset, but the shard step's source "
                            f"{shard.info.get('source')!r} has no classes")
    num_classes = len(classes)
    autoencoder = inputs.get("autoencoder")  # its image_size is the base resolution the DiT samples at
    size = int((autoencoder.info.get("image_size") if autoencoder else None) or shard.info["image_size"])
    train_x, train_y = read_split(shard, "train", size)
    val_x, val_y = read_split(shard, "val", size)
    if len(val_x) < 2:
        raise EvaluateError(f"evaluate needs at least 2 validation images; the shard step wrote {len(val_x)} "
                            f"(raise shard.val_fraction)")

    # 1. the classifier, on the real training images
    classifier, train_stats = train_classifier(train_x, train_y, num_classes, cfg.classifier, device,
                                               log_metrics=ctx.tracker.log_metrics)
    val_logits, val_features = classify(classifier, val_x)
    val_accuracy = float((val_logits.argmax(1) == val_y).mean())
    log.info("evaluate: classifier val accuracy %.4f after %d steps (%.1fs)", val_accuracy,
             cfg.classifier.steps, train_stats["classifier_train_seconds"])
    meta = {"preset": cfg.classifier.preset, "in_channels": int(train_x.shape[1]), "num_classes": num_classes,
            "classes": list(classes), "image_size": int(train_x.shape[-1]), "val_accuracy": val_accuracy,
            "input_range": "uint8 / 127.5 - 1", "train": cfg.classifier.model_dump(mode="json")}
    files = save_classifier(classifier, meta, ctx.output)

    # 2. samples for every class, classified
    labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    images = generate_samples(inputs, labels, cfg.sample, cfg.batch_size, device, list(classes)).cpu()
    if images.dtype != torch.uint8 or tuple(images.shape) != (len(labels), *train_x.shape[1:]):
        raise EvaluateError(f"generated images are {images.dtype} {tuple(images.shape)}; the classifier "
                            f"needs uint8 {(len(labels), *train_x.shape[1:])} like the shard step's images")
    gen_logits, gen_features = classify(classifier, images)
    correct = gen_logits.argmax(1) == labels.numpy()
    per_class = {name: float(correct[labels.numpy() == k].mean()) for k, name in enumerate(classes)}

    # 3. Fréchet distances in classifier feature space, against the validation images
    rng = np.random.default_rng(cfg.classifier.seed)
    baseline_index = np.sort(rng.choice(len(train_x), size=min(len(images), len(train_x)), replace=False))
    _, baseline_features = classify(classifier, train_x[baseline_index])
    metrics = {
        "classifier_val_accuracy": val_accuracy,
        "sample_accuracy": float(correct.mean()),
        **{metric_name(name): acc for name, acc in per_class.items()},
        "frechet_distance": frechet_distance_of(val_features, gen_features),
        "frechet_distance_real_baseline": frechet_distance_of(val_features, baseline_features),
        **train_stats,
    }
    inception = None
    if cfg.inception_enabled:  # FID/KID on the first inception.samples_per_class of each class
        from components.evaluate.reference import InceptionScorer

        if "inception_reference" not in inputs:
            raise EvaluateError("evaluate.inception is set, but the step has no inception_reference input")
        inception = InceptionScorer(inputs["inception_reference"], cfg.inception, device)
        metrics.update(inception("base", images[first_per_class(labels, num_classes, cfg.inception.samples_per_class)]))
    counts = {"train": len(train_x), "val": len(val_x), "generated": len(images),
              "samples_per_class": cfg.samples_per_class, "baseline_train": len(baseline_index)}
    evaluation = {"metrics": metrics, "per_class_accuracy": per_class, "classes": list(classes),
                  "sampling": cfg.sample.model_dump(mode="json"), "generation_batch_size": cfg.batch_size,
                  "counts": counts, "reference_split": "val", "baseline_split": "train",
                  "classifier": {k: v for k, v in meta.items() if k != "classes"}}

    files += [SAMPLES_GRID, EVALUATION]
    if "distill" in inputs:  # 4. quality against network evaluations, teacher and student
        from components.evaluate.distill_table import QUALITY_PLOT, QUALITY_TABLE, quality_plot, quality_table

        rows, table_metrics = quality_table(cfg, inputs, classifier, val_features, num_classes, device)
        metrics.update(table_metrics)
        evaluation["quality_vs_steps"] = rows
        plot = quality_plot(rows)
        ctx.output.write_text(QUALITY_TABLE, json.dumps(rows, indent=2))
        ctx.output.write_bytes(QUALITY_PLOT, png_bytes(plot))
        ctx.tracker.log_dict({"rows": rows}, QUALITY_TABLE)
        ctx.tracker.log_image(plot, QUALITY_PLOT)
        files += [QUALITY_TABLE, QUALITY_PLOT]
    if stage_names(inputs):  # 6. the composed cascade, at the final resolution
        score_final = None
        if inception is not None and "cascade" in inception.targets:
            def score_final(final, final_labels):
                chosen = first_per_class(final_labels, num_classes, cfg.inception.samples_per_class)
                return inception("cascade", final[chosen])
        cascade_metrics, cascade_grid, evaluation["cascade"] = score_cascade(
            cfg, inputs, images, labels, list(classes), device, log_metrics=ctx.tracker.log_metrics,
            score_images=score_final)
        metrics.update(cascade_metrics)
        ctx.output.write_bytes(CASCADE_GRID, png_bytes(cascade_grid))
        ctx.tracker.log_image(cascade_grid, CASCADE_GRID)
        files.append(CASCADE_GRID)
    if "noisy_classifier" in inputs:  # 7. classifier guidance beside classifier-free guidance
        from components.evaluate.guidance_table import GUIDANCE_GRID, GUIDANCE_TABLE, guidance_table

        rows, guidance_metrics, guidance_grid = guidance_table(cfg, inputs, classifier, val_features, num_classes,
                                                               device)
        metrics.update(guidance_metrics)
        evaluation["guidance_comparison"] = rows
        ctx.output.write_text(GUIDANCE_TABLE, json.dumps(rows, indent=2))
        ctx.output.write_bytes(GUIDANCE_GRID, png_bytes(guidance_grid))
        ctx.tracker.log_dict({"rows": rows}, GUIDANCE_TABLE)
        ctx.tracker.log_image(guidance_grid, GUIDANCE_GRID)
        files += [GUIDANCE_TABLE, GUIDANCE_GRID]

    grid = class_grid(images, labels.tolist(), min(cfg.grid_per_class, cfg.samples_per_class))
    ctx.output.write_bytes(SAMPLES_GRID, png_bytes(grid))
    ctx.output.write_text(EVALUATION, json.dumps(evaluation, indent=2, sort_keys=True))
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_image(grid, SAMPLES_GRID)
    ctx.tracker.log_dict(evaluation, EVALUATION)
    log.info("evaluate: sample accuracy %.4f, FD %.3f (real baseline %.3f)%s", metrics["sample_accuracy"],
             metrics["frechet_distance"], metrics["frechet_distance_real_baseline"],
             f"; FID {metrics['fid']:.2f}, KID {metrics['kid']:.4f}" if "fid" in metrics else "")
    return StepOutput(files=files, metrics=metrics,
                      info={"classes": list(classes), "counts": counts, "reference_split": "val",
                            "classifier": CLASSIFIER_WEIGHTS, "classifier_meta": CLASSIFIER_META})
