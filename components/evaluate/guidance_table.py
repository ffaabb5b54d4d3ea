"""The evaluate step's guidance comparison: classifier guidance (Dhariwal & Nichol 2021) with the
noisy_classifier step at each ``classifier_weights`` (alone: classifier-free guidance off), beside
classifier-free guidance at each ``cfg_weights`` (no classifier), on the same labels, seeds, sampler
and judge as the rest of the step. Scored like ``distill_table``: requested-class accuracy and the
Fréchet distance in the judge's feature space.
"""

from __future__ import annotations

import torch

from components.common.step import Manifest
from components.evaluate.config import EvaluateConfig
from components.evaluate.distill_table import score_sampler
from components.evaluate.metrics import RunningMoments

GUIDANCE_TABLE = "guidance_comparison.json"
GUIDANCE_GRID = "guidance_comparison.png"  # a class grid per row, left to right in the table's order


def guidance_table(cfg: EvaluateConfig, inputs: dict[str, Manifest], classifier, val_moments: RunningMoments,
                   num_classes: int, device: str) -> tuple[list[dict], dict[str, float], object]:
    """(rows, metrics ``cfg_w<w>_*`` and ``classifier_w<w>_*``: sample_accuracy, frechet_distance,
    a grid: one class grid per row, side by side)."""
    from components.autoencoder.load import load_autoencoder
    from components.common.plot import side_by_side
    from components.common.images import class_grid
    from components.dit.generate import generate
    from components.dit.load import load_dit
    from components.noisy_classifier.load import load_noisy_classifier

    settings = cfg.guidance_comparison
    labels = torch.arange(num_classes).repeat_interleave(settings.samples_per_class)
    dit, dit_meta = load_dit(inputs["dit"], device=device)
    ae, ae_meta = load_autoencoder(inputs["autoencoder"], device=device)
    noisy = load_noisy_classifier(inputs["noisy_classifier"], device=device)
    runs = [(f"cfg_w{w:g}", {"guidance": w, "classifier_guidance": 0.0}) for w in settings.cfg_weights]
    runs += [(f"classifier_w{w:g}", {"guidance": 0.0, "classifier_guidance": w}) for w in settings.classifier_weights]
    rows, metrics, grids = [], {}, []
    for name, update in runs:
        sampling = cfg.sample.model_copy(update=update)
        drawn = []

        def draw():
            drawn.append(generate(dit, dit_meta, ae, ae_meta, labels, sampling, batch_size=cfg.batch_size,
                                  classifier=noisy))
            return drawn[-1]

        # forward passes per image and step: the DiT twice under CFG; the classifier's gradient ~ 2 of its own
        nfe = sampling.steps * (2 if sampling.guidance > 0 else 1)
        row = score_sampler(name, sampling.steps, nfe, draw, classifier, labels, val_moments)
        grids.append(class_grid(drawn[-1], labels.tolist(), min(8, settings.samples_per_class)))
        row.update(guidance=sampling.guidance, classifier_guidance=sampling.classifier_guidance)
        rows.append(row)
        metrics.update({f"{name}_{k}": float(row[k]) for k in ("sample_accuracy", "frechet_distance")})
    return rows, metrics, side_by_side(grids)
