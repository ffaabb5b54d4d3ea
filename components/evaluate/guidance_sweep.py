"""The evaluate step's classifier-free guidance sweep (Ho & Salimans 2022, the FID-against-guidance
trade-off): the DiT's samples drawn again at every weight w of ``guidance_sweep.weights`` on the same
labels, seeds and sampler, each scored by the step's judge:

- class accuracy (the requested class won);
- the Fréchet distance to the validation images in the judge's feature space;
- within-class diversity: the mean pairwise distance between the judge's features of samples of one
  class, averaged over classes, divided by the same measure on as many real validation images per
  class (1: as varied as real digits; guidance pulls it down as it sharpens each class).

The weight chosen is the one with the lowest Fréchet distance among those whose accuracy is at least
``min_accuracy`` (``guidance_sweep_best_w``; NaN when none reaches it). The numbers go to
``guidance_sweep.json`` and the curves to ``guidance_sweep.png``, both also in MLflow.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from components.common.step import Manifest

GUIDANCE_SWEEP = "guidance_sweep.json"
GUIDANCE_SWEEP_PLOT = "guidance_sweep.png"


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over the distinct pairs of rows of ``features`` (N, D); NaN below 2 rows."""
    n = len(features)
    if n < 2:
        return float("nan")
    squared = (features ** 2).sum(1)
    gram = squared[:, None] + squared[None, :] - 2.0 * features @ features.T  # (N, N)
    distances = np.sqrt(np.clip(gram, 0.0, None))
    return float(distances[np.triu_indices(n, k=1)].mean())


def within_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes present (with 2 or more rows) of their mean pairwise feature distance."""
    per_class = [mean_pairwise_distance(features[labels == k]) for k in np.unique(labels)]
    finite = [d for d in per_class if math.isfinite(d)]
    return float(np.mean(finite)) if finite else float("nan")


def real_features_per_class(judge, shard: Manifest, size: int | None, per_class: int, num_classes: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The judge's features of the first ``per_class`` validation images of each class, streamed (the
    pass stops once every class has its share)."""
    from components.evaluate.judge import classify, split_batches

    kept_features, kept_labels, have = [], [], np.zeros(num_classes, dtype=int)
    for images, labels in split_batches(shard, "val", size):
        take = np.zeros(len(labels), dtype=bool)
        for i, label in enumerate(labels):
            if 0 <= label < num_classes and have[label] < per_class:
                take[i], have[label] = True, have[label] + 1
        if take.any():
            kept_features.append(classify(judge.model, images[take])[1])
            kept_labels.append(labels[take])
        if (have >= per_class).all():
            break
    if not kept_features:
        return np.zeros((0, judge.model.logits.in_features)), np.zeros((0,), dtype=int)
    return np.concatenate(kept_features), np.concatenate(kept_labels)


def best_weight(rows: list[dict], min_accuracy: float) -> float:
    """The w with the lowest Fréchet distance among rows with accuracy >= ``min_accuracy``; NaN if none."""
    eligible = [row for row in rows if row["sample_accuracy"] >= min_accuracy]
    return min(eligible, key=lambda row: row["frechet_distance"])["guidance"] if eligible else float("nan")


def guidance_sweep(cfg, inputs: dict[str, Manifest], judge, num_classes: int, size: int | None, device: str
                   ) -> tuple[list[dict], dict[str, float], object]:
    """(rows, metrics ``guidance_w<w>_*`` + ``guidance_sweep_best_w`` + ``real_within_class_diversity``, plot)."""
    from components.autoencoder.load import load_autoencoder
    from components.dit.generate import generate
    from components.dit.load import load_dit
    from components.evaluate.distill_table import score_sampler
    from components.evaluate.judge import classify

    settings = cfg.guidance_sweep
    labels = torch.arange(num_classes).repeat_interleave(settings.samples_per_class)
    dit, dit_meta = load_dit(inputs["dit"], device=device)
    ae, ae_meta = load_autoencoder(inputs["autoencoder"], device=device)
    real, real_labels = real_features_per_class(judge, inputs["shard"], size, settings.samples_per_class, num_classes)
    real_diversity = within_class_diversity(real, real_labels)
    rows, metrics = [], {"real_within_class_diversity": real_diversity}
    for w in settings.weights:
        sampling = cfg.sample.model_copy(update={"guidance": w})
        drawn = []

        def draw():
            drawn.append(generate(dit, dit_meta, ae, ae_meta, labels, sampling, batch_size=cfg.batch_size))
            return drawn[-1]

        row = score_sampler(f"cfg w={w:g}", sampling.steps, sampling.steps * (2 if w > 0 else 1), draw,
                            judge.model, labels, judge.val.moments)
        diversity = within_class_diversity(classify(judge.model, drawn[-1])[1], labels.numpy())
        row.update(guidance=w, within_class_diversity=diversity, diversity_ratio=diversity / real_diversity)
        rows.append(row)
        metrics.update({f"guidance_w{w:g}_{k}": float(row[k])
                        for k in ("sample_accuracy", "frechet_distance", "diversity_ratio")})
    metrics["guidance_sweep_best_w"] = best_weight(rows, settings.min_accuracy)
    return rows, metrics, sweep_plot(rows, settings.min_accuracy)


def sweep_plot(rows: list[dict], min_accuracy: float):
    """Accuracy, Fréchet distance and diversity against w, and the Fréchet distance against accuracy."""
    from components.common.plot import line_chart, side_by_side

    def against_w(key):
        return {"cfg": [(row["guidance"], row[key]) for row in rows]}

    charts = [line_chart(against_w("sample_accuracy") | {f"accuracy {min_accuracy:g}": [
                  (row["guidance"], min_accuracy) for row in rows]}, "class accuracy vs guidance", "w", "accuracy",
                  log2_x=False),
              line_chart(against_w("frechet_distance"), "Frechet distance vs guidance", "w", "FD", log2_x=False),
              line_chart(against_w("diversity_ratio"), "within-class diversity / real", "w", "ratio", log2_x=False),
              line_chart({"cfg": [(row["sample_accuracy"], row["frechet_distance"]) for row in rows]},
                         "FD against accuracy (the trade-off)", "accuracy", "FD", log2_x=False)]
    return side_by_side(charts)
