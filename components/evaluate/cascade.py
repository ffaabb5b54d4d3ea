"""The evaluate step's cascade scores: the composed sampler's images at the final resolution, judged
like the DiT's own samples, by a classifier trained here on the real images brought to that size.

The real images are resized with the last stage's ``filter``, exactly as that stage's training
targets were made, so the classifier sees real and generated images of the same kind. The base
images come from the DiT samples the step already drew: the first ``cascade_samples_per_class``
of each class go through the super-resolution stages. Text stages take those samples' prompts:
the ones a text DiT drew them from, or, under a class DiT, validation captions of each sample's class
(``prompts_per_class``), so that the stage is judged on the kind of caption it was trained on.
"""

from __future__ import annotations

import logging

import torch

from components.common.step import Manifest
from components.common.images import class_grid
from components.evaluate.config import EvaluateConfig
from components.evaluate.metrics import frechet_distance_to

CASCADE_GRID = "cascade_samples.png"

log = logging.getLogger(__name__)


def stage_names(inputs: dict[str, Manifest]) -> list[str]:
    """The super-resolution steps among the inputs, lowest stage first."""
    return sorted((k for k in inputs if k.startswith("superres_")), key=lambda k: int(k.rsplit("_", 1)[1]))


def first_per_class(labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    return torch.cat([torch.nonzero(labels == k).flatten()[:per_class] for k in range(num_classes)])


def cascade_prompts(shard: Manifest, labels: torch.Tensor, classes: list[str], chosen: torch.Tensor,
                    prompts: list[str] | None) -> list[str]:
    """One prompt per chosen sample: its own (a text DiT's), else a validation caption of its class."""
    if prompts is not None:
        return [prompts[i] for i in chosen.tolist()]
    from components.evaluate.prompts import prompts_per_class

    chosen_labels = labels[chosen].tolist()
    per_class = max(chosen_labels.count(k) for k in set(chosen_labels))
    captions = prompts_per_class(shard, classes, per_class)  # class-major, per_class each
    seen = {k: 0 for k in range(len(classes))}
    picked = []
    for label in chosen_labels:
        picked.append(captions[label * per_class + seen[label]])
        seen[label] += 1
    return picked


def score_cascade(cfg: EvaluateConfig, inputs: dict[str, Manifest], base_images: torch.Tensor, labels: torch.Tensor,
                  classes: list[str], device: str, log_metrics=None, score_images=None,
                  prompts: list[str] | None = None) -> tuple[dict[str, float], object, dict]:
    """(metrics prefixed ``cascade_``, grid image, details) for the cascade of the inputs' SR stages.
    ``score_images(images, labels)``, if given, returns more metrics (unprefixed) of the final images.
    ``prompts``: a text DiT's, one per base image, for the text stages."""
    from components.evaluate.judge import baseline_distance, classify, fit_judge
    from components.superres.load import load_superres
    from components.superres.sample import cascade

    names = stage_names(inputs)
    stages = [load_superres(inputs[name], device=device) for name in names]
    size, filter = int(stages[-1].meta.output_size), stages[-1].meta.filter
    classifier_cfg = cfg.cascade_classifier or cfg.classifier
    judge = fit_judge(inputs["shard"], size, filter, classifier_cfg, len(classes), device,
                      log_metrics=log_metrics and (lambda m, s: log_metrics({f"cascade_{k}": v for k, v in m.items()}, s)))

    chosen = first_per_class(labels, len(classes), cfg.cascade_samples_per_class)
    chosen_labels = labels[chosen]
    stage_prompts = None
    if any(stage.takes_text for stage in stages):
        stage_prompts = cascade_prompts(inputs["shard"], labels, classes, chosen, prompts)
    images = cascade(base_images[chosen], stages, chosen_labels, seed=cfg.sample.seed, batch_size=cfg.batch_size,
                     prompts=stage_prompts)
    logits, features = classify(judge.model, images)
    correct = logits.argmax(1) == chosen_labels.numpy()
    baseline, _ = baseline_distance(judge, inputs["shard"], size, filter, len(images), classifier_cfg.seed)
    metrics = {
        "cascade_classifier_val_accuracy": judge.val.accuracy,
        "cascade_sample_accuracy": float(correct.mean()),
        "cascade_frechet_distance": frechet_distance_to(judge.val.moments, features),
        "cascade_frechet_distance_real_baseline": baseline,
        "cascade_classifier_train_seconds": judge.train_stats["classifier_train_seconds"],
    }
    if score_images is not None:
        metrics.update({f"cascade_{k}": v for k, v in score_images(images, chosen_labels).items()})
    grid = class_grid(images, chosen_labels.tolist(), min(cfg.grid_per_class, cfg.cascade_samples_per_class))
    details = {"stages": names, "final_size": size, "generated": len(images),
               "text_stages": [n for n, s in zip(names, stages) if s.takes_text],
               "stage_sampling": {n: s.sampling.model_dump(mode="json") for n, s in zip(names, stages)}}
    log.info("evaluate: cascade %s -> %d px, sample accuracy %.4f, FD %.3f (real baseline %.3f)", "+".join(names),
             size, metrics["cascade_sample_accuracy"], metrics["cascade_frechet_distance"],
             metrics["cascade_frechet_distance_real_baseline"])
    return metrics, grid, details
