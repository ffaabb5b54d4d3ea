"""The evaluate step's saved judge: how it is written and read back.

The step writes ``classifier.safetensors`` (the judge's weights) and ``classifier.json`` (preset,
in_channels, num_classes, classes, image_size, val_accuracy, input range, training settings), so
that later tools (benchmarks, the guidance comparison) score images with the same judge.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common.stage_meta import StageMeta

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.common.storage import Storage
    from components.evaluate.classifier import EvalClassifier

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_META = "classifier.json"


@dataclass
class ClassifierMeta(StageMeta):
    """``classifier.json``: enough to rebuild the judge and feed it images as it was trained."""

    preset: str
    in_channels: int
    num_classes: int
    classes: list[str]
    image_size: int  # the size it judges at: the base resolution the DiT samples at
    val_accuracy: float  # on the real validation split
    input_range: str  # how uint8 images become its input ("uint8 / 127.5 - 1")
    train: dict[str, Any]  # its training settings (evaluate.classifier)


def save_classifier(model: "EvalClassifier", meta: ClassifierMeta, output: "Storage") -> list[str]:
    """Write ``classifier.safetensors`` and ``classifier.json``; returns their relative paths."""
    from safetensors.torch import save_file

    scratch = Path(tempfile.mkdtemp(prefix="latentflow-classifier-"))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(scratch / CLASSIFIER_WEIGHTS), metadata={"preset": meta.preset})
        output.upload(CLASSIFIER_WEIGHTS, scratch / CLASSIFIER_WEIGHTS)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    output.write_text(CLASSIFIER_META, json.dumps(meta.to_json(), indent=2, sort_keys=True))
    return [CLASSIFIER_WEIGHTS, CLASSIFIER_META]


def load_classifier(manifest: "Manifest", device: str = "cpu") -> tuple["EvalClassifier", ClassifierMeta]:
    """The evaluate step's classifier (eval mode) and its meta: preset, in_channels, num_classes,
    classes, image_size, val_accuracy, input range ("uint8 / 127.5 - 1")."""
    from safetensors.torch import load as load_safetensors

    from components.common.step import read_output
    from components.evaluate.classifier import build_classifier

    meta = ClassifierMeta.read(manifest, CLASSIFIER_META)  # checked against the manifest's sha256
    model = build_classifier(meta.preset, meta.in_channels, meta.num_classes)
    model.load_state_dict(load_safetensors(read_output(manifest, CLASSIFIER_WEIGHTS)))
    return model.to(device).eval(), meta
