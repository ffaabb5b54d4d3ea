"""The evaluate step's quality-versus-cost table: the teacher DiT at ``teacher_steps`` DDIM steps
and the distilled student at each step count it supports, on the same classifier, labels, seeds
and sample count, with the network evaluations (NFE) each image took and the measured images/s.

NFE counts forward passes per image: the teacher under classifier-free guidance (w > 0) makes two
per step (conditional and unconditional, one batch); the student has the guidance folded in and
makes one. Quality is the requested-class accuracy and the Fréchet distance in the classifier's
feature space against the validation images, as for the DiT's own samples.

A text-conditioned teacher and its student draw from prompts instead of labels: the same prompts the
step gives the text DiT (``prompts_per_class``: validation captions of each class, class-major, so
the judged class of each image is the class its prompt's caption came from), the same for both.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from components.common.step import Manifest
from components.evaluate.config import EvaluateConfig
from components.evaluate.metrics import RunningMoments, frechet_distance_to

if TYPE_CHECKING:
    from components.distill.load import StudentMeta
    from components.dit.load import DitMeta

QUALITY_TABLE = "quality_vs_steps.json"
QUALITY_PLOT = "quality_vs_steps.png"

log = logging.getLogger(__name__)


def score_sampler(name: str, steps: int, nfe: int, draw, classifier, labels: torch.Tensor, val_moments) -> dict:
    from components.evaluate.judge import classify

    started = time.perf_counter()
    images = draw()
    seconds = time.perf_counter() - started
    logits, features = classify(classifier, images)
    row = {"sampler": name, "steps": steps, "nfe": nfe, "images": len(images),
           "sample_accuracy": float((logits.argmax(1) == labels.numpy()).mean()),
           "frechet_distance": frechet_distance_to(val_moments, features),
           "seconds": seconds, "images_per_s": len(images) / max(seconds, 1e-9)}
    log.info("evaluate: %s at %d steps (%d NFE): accuracy %.4f, FD %.3f, %.1f img/s", name, steps, nfe,
             row["sample_accuracy"], row["frechet_distance"], row["images_per_s"])
    return row


def quality_table(cfg: EvaluateConfig, inputs: dict[str, Manifest], classifier, val_moments: RunningMoments,
                  num_classes: int, device: str) -> tuple[list[dict], dict[str, float]]:
    """(rows, metrics named ``teacher_<s>step_*`` and ``student_<s>step_*``)."""
    from components.autoencoder.load import load_autoencoder
    from components.distill.load import load_student
    from components.distill.sample import generate_student, supported_steps
    from components.dit.generate import generate
    from components.dit.load import load_dit

    per_class = cfg.distill_samples_per_class or cfg.samples_per_class
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    dit, dit_meta = load_dit(inputs["dit"], device=device)
    ae, ae_meta = load_autoencoder(inputs["autoencoder"], device=device)
    student, student_meta = load_student(inputs["distill"], device=device)
    prompts = table_prompts(inputs, dit_meta, student_meta, per_class)
    given = None if prompts is not None else labels  # a text-only model takes prompts alone
    rows = []
    for steps in cfg.teacher_steps:
        sampling = cfg.sample.model_copy(update={"steps": steps})
        nfe = steps * (2 if sampling.guidance > 0 else 1)
        rows.append(score_sampler("teacher", steps, nfe, lambda: generate(dit, dit_meta, ae, ae_meta, given, sampling,
                                                                   batch_size=cfg.batch_size, prompts=prompts),
                           classifier, labels, val_moments))
    for steps in supported_steps(student_meta):
        rows.append(score_sampler(f"student ({student_meta.method})", steps, steps,
                           lambda: generate_student(student, student_meta, ae, ae_meta, given, steps=steps,
                                                    seed=cfg.sample.seed, batch_size=cfg.batch_size, prompts=prompts),
                           classifier, labels, val_moments))
    metrics = {}
    for row in rows:
        prefix = f"{row['sampler'].split(' ')[0]}_{row['steps']}step_"
        metrics.update({prefix + k: float(row[k]) for k in ("sample_accuracy", "frechet_distance", "images_per_s")})
    return rows, metrics


def table_prompts(inputs: dict[str, Manifest], dit_meta: "DitMeta", student_meta: "StudentMeta",
                  per_class: int) -> list[str] | None:
    """The prompts of a text teacher and its student (None for class-conditional ones), ``per_class``
    validation captions of each class, as the step prompts the text DiT."""
    from components.evaluate.judge import EvaluateError
    from components.evaluate.prompts import prompts_per_class

    text = dit_meta.uses_text
    if text != student_meta.uses_text:
        raise EvaluateError(f"the distill step's student ({inputs['distill'].output_uri}) and the dit step's DiT "
                            "differ in conditioning (text or class): the student was distilled from another DiT")
    if not text:
        return None
    classes = list(inputs["shard"].info["classes"])  # the step has checked them: num_classes of them
    return prompts_per_class(inputs["shard"], classes, per_class)


def quality_plot(rows: list[dict]):
    """Accuracy and Fréchet distance against NFE (log 2 axis), one line per sampler."""
    from components.common.plot import line_chart, side_by_side

    charts = []
    for key, label in (("sample_accuracy", "class accuracy"), ("frechet_distance", "Frechet distance")):
        series: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            series.setdefault(row["sampler"], []).append((row["nfe"], row[key]))
        charts.append(line_chart(series, f"{label} vs network evaluations per image", "NFE per image", label))
    return side_by_side(charts)
