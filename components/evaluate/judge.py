"""The evaluate step's judge: a small classifier trained on the real images, streamed from the shards,
whose logits score generated samples' class accuracy and whose penultimate features give a
Fréchet distance against the real validation images' running statistics.

Nothing here holds a split in memory: training reads seeded batches from the shard stream
(``components.common.stream``), and the validation split is scored batch by batch into a
``RunningMoments`` (mean and covariance of the features) and an accuracy count. Memory is a batch
of images plus the D x D covariance, whatever the data set's size.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from components.common.step import Manifest
from components.evaluate.classifier import EvalClassifier, build_classifier
from components.evaluate.config import ClassifierTrainConfig
from components.evaluate.metrics import RunningMoments, frechet_distance_to

LOG_EVERY = 50
SCORE_BATCH = 500


class EvaluateError(ValueError):
    """The evaluate step cannot run on these inputs; the message names the step or file at fault."""


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1], the range every model here is trained in."""
    return images.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------- real images, streamed


def training_batches(shard: Manifest, size: int | None, filter: str, batch_size: int, seed: int,
                     loader=None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded ``{"image": uint8, "label"}`` batches of the shard step's training split,
    resized to ``size`` with ``filter``, epoch after epoch (one worker's plan of the whole split)."""
    from components.common.data import ImageDecoder, image_split
    from components.common.stream import LoaderConfig, ShardSource

    spec = image_split(shard, "train")
    batch_size = min(batch_size, sum(spec.counts))
    source = ShardSource(spec, ImageDecoder(shard.info.get("image_format", "png"), size, filter), batch_size, seed,
                         0, 1, loader or LoaderConfig())
    try:
        epoch = 0
        while True:
            for batch in source.epoch(epoch, 0, 0):
                yield batch.tensors
            epoch += 1
    finally:
        source.close()


def tensor_batches(images, labels, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The same for images already in memory (tests, benchmarks): uint8 (N, C, H, W), labels (N,)."""
    from components.common.stream import TensorSource

    images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.long)
    source = TensorSource({"image": images, "label": labels}, min(batch_size, len(images)), seed, 0, 1)
    epoch = 0
    while True:
        for batch in source.epoch(epoch, 0, 0):
            yield batch.tensors
        epoch += 1


def split_batches(shard: Manifest, split: str, size: int | None = None, filter: str = "bicubic",
                  batch_size: int = SCORE_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over a split in shard order: (uint8 images, labels) batches."""
    from components.common.shard_reader import iter_image_batches

    rels = shard.info.get(f"{split}_shards") or []
    return iter_image_batches(shard.storage(), rels, shard.info.get("image_format", "png"), batch_size, size, filter)


def read_split(shard: Manifest, split: str, size: int | None = None,
               filter: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory (uint8 images, labels): for small sets only (benchmarks, tests); the
    step itself streams."""
    batches = list(split_batches(shard, split, size, filter))
    if not batches:
        c, side = int(shard.info.get("channels", 1)), int(size or shard.info.get("image_size", 0))
        return np.zeros((0, c, side, side), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def first_images(batches: Iterator[dict[str, torch.Tensor]], count: int) -> torch.Tensor:
    """The first ``count`` images of a batch stream (uint8)."""
    taken, have = [], 0
    for batch in batches:
        taken.append(batch["image"][: count - have])
        have += len(taken[-1])
        if have >= count:
            break
    return torch.cat(taken)


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


def _check_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0 or (labels < 0).any() or (labels >= num_classes).any():
        raise EvaluateError(f"classifier training needs labelled images with labels in [0, {num_classes}); "
                            f"got {len(images)} images, labels {labels.unique().tolist()[:12]}")


def train_classifier(batches: Iterator[dict[str, torch.Tensor]], num_classes: int, cfg: ClassifierTrainConfig,
                     device: str = "cpu", log_metrics=None) -> tuple[EvalClassifier, dict[str, float]]:
    """Train a classifier from ``cfg`` on ``cfg.steps`` batches of ``{"image": uint8, "label"}``;
    returns it in eval mode and {"classifier_train_loss", "classifier_train_seconds"}. Deterministic
    in ``cfg.seed`` and the batches on CPU. ``log_metrics(metrics, step)`` gets the running loss."""
    t0 = time.monotonic()
    generator = torch.Generator().manual_seed(cfg.seed)
    model = optimizer = schedule = None
    running = None
    for step in range(cfg.steps):
        batch = next(batches)
        images, labels = batch["image"], batch["label"].long()
        _check_batch(images, labels, num_classes)
        if model is None:
            model, optimizer, schedule = _new_classifier(cfg, int(images.shape[1]), num_classes, device)
        x = random_shift(to_unit_range(images), cfg.max_shift, generator).to(device)
        loss = F.cross_entropy(model(x), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if log_metrics is not None and ((step + 1) % LOG_EVERY == 0 or step + 1 == cfg.steps):
            log_metrics({"classifier_train_loss": running}, step + 1)
    model.eval()
    return model, {"classifier_train_loss": float(running), "classifier_train_seconds": time.monotonic() - t0}


def _new_classifier(cfg: ClassifierTrainConfig, in_channels: int, num_classes: int, device: str):
    """(model, AdamW, linear warm-up then cosine to 0), the model initialised from ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_classifier(cfg.preset, in_channels, num_classes).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warmup = max(1, min(50, cfg.steps // 10))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))

    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


@torch.inference_mode()
def classify(model: EvalClassifier, images: np.ndarray | torch.Tensor, batch_size: int = SCORE_BATCH,
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


@dataclass
class RealScores:
    accuracy: float  # the judge's accuracy on the split
    moments: RunningMoments  # mean and covariance of its features on the split
    count: int


def score_real(model: EvalClassifier, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> RealScores:
    """The judge on a real split, streamed: accuracy, and the running statistics of its features."""
    moments, correct, count = RunningMoments(model.logits.in_features), 0, 0
    for images, labels in batches:
        logits, features = classify(model, images)
        moments.update(features)
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    return RealScores(correct / max(count, 1), moments, count)


@dataclass
class Judge:
    model: EvalClassifier
    val: RealScores  # on the validation split
    train_stats: dict[str, float]
    train_count: int  # training images of the split it learnt from
    image_shape: tuple[int, int, int]  # (C, H, W) it judges


def fit_judge(shard: Manifest, size: int | None, filter: str, cfg: ClassifierTrainConfig, num_classes: int,
              device: str = "cpu", log_metrics=None) -> Judge:
    """Train the judge on the shard step's training split at ``size`` (resized with ``filter``),
    streamed, and score it on the validation split, streamed."""
    from contextlib import closing

    from components.common.data import split_counts

    val_count = sum(split_counts(shard, "val"))
    if val_count < 2:
        raise EvaluateError(f"evaluate needs at least 2 validation images; the shard step ({shard.output_uri}) wrote "
                            f"{val_count} (raise shard.val_fraction)")
    with closing(training_batches(shard, size, filter, cfg.batch_size, cfg.seed)) as batches:
        model, stats = train_classifier(batches, num_classes, cfg, device, log_metrics)
    val = score_real(model, split_batches(shard, "val", size, filter))
    side = int(size or shard.info["image_size"])
    return Judge(model, val, stats, sum(split_counts(shard, "train")),
                 (int(shard.info["channels"]), side, side))


def baseline_distance(judge: Judge, shard: Manifest, size: int | None, filter: str, count: int,
                      seed: int) -> tuple[float, int]:
    """(Fréchet distance to the validation split of ``count`` real training images, how many): the
    floor a perfect generator of ``count`` samples would reach. The images are the first of a
    seeded stream of the training split: a random subset, read without holding the split."""
    from contextlib import closing

    count = min(count, judge.train_count)
    with closing(training_batches(shard, size, filter, min(count, SCORE_BATCH), seed)) as batches:
        images = first_images(batches, count)
    _, features = classify(judge.model, images)
    return frechet_distance_to(judge.val.moments, features), len(images)


# ---------------------------------------------------------------- generated images


def metric_name(class_name: str) -> str:
    return "sample_accuracy_class_" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(class_name))


def score_samples(judge: Judge, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Accuracy overall and per class, and the Fréchet distance to the validation images."""
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != judge.image_shape:
        raise EvaluateError(f"generated images are {images.dtype} {tuple(images.shape)}; the classifier "
                            f"needs uint8 (N, {', '.join(map(str, judge.image_shape))}) like the shard step's images")
    logits, features = classify(judge.model, images)
    correct = logits.argmax(1) == labels.numpy()
    per_class = {name: float(correct[labels.numpy() == k].mean()) for k, name in enumerate(classes)}
    return {"sample_accuracy": float(correct.mean()), "per_class": per_class,
            "frechet_distance": frechet_distance_to(judge.val.moments, features),
            "predicted": logits.argmax(1).tolist()}
