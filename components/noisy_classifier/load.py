"""Load a trained noisy classifier from its step's outputs (local or S3), safetensors only.

The step writes ``noisy_classifier.safetensors`` (EMA weights: what guidance uses),
``noisy_classifier_raw.safetensors`` (the online weights) and ``noisy_classifier.json`` (the
resolved ``NoisyClassifier`` arguments under ``model``, the schedule, classes, latent shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.common.stage_meta import StageMeta
from components.common.step import read_output

if TYPE_CHECKING:
    import torch

WEIGHTS, RAW_WEIGHTS, META = "noisy_classifier.safetensors", "noisy_classifier_raw.safetensors", "noisy_classifier.json"


@dataclass
class NoisyClassifierMeta(StageMeta):
    """``noisy_classifier.json``."""

    preset: str
    model: dict[str, Any]  # the resolved NoisyClassifier arguments
    schedule: str  # the DiT's noise schedule, by name, and its length
    num_timesteps: int
    classes: list[str]
    latent_shape: list[int] | None = None  # [C, H, W] of the latents it classifies
    parameters: int | None = None


def load_noisy_classifier(source, device: str = "cpu", ema: bool = True
                          ) -> tuple["torch.nn.Module", NoisyClassifierMeta]:
    """(classifier in eval mode, meta) from the step's manifest (files checked against their sha256),
    Storage or URI; safetensors only."""
    import safetensors.torch

    from components.noisy_classifier.model import NoisyClassifier

    meta = NoisyClassifierMeta.read(source, META)
    model = NoisyClassifier(**meta.model)
    model.load_state_dict(safetensors.torch.load(read_output(source, WEIGHTS if ema else RAW_WEIGHTS)))
    return model.to(device).eval(), meta
