"""Load a trained super-resolution stage from its step's outputs (local or S3), safetensors only.

The step writes ``superres.safetensors`` (EMA weights: what sampling uses), ``superres_raw.safetensors``
(the online weights) and ``superres.json`` (the resolved ``EfficientUNet`` arguments under ``model``,
sizes, schedule, channels, classes, the stage's sampling defaults and augmentation settings).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from components.common.step import read_output

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.common.storage import Storage
    from components.superres.sample import SrStage

SR_WEIGHTS = "superres.safetensors"
SR_RAW_WEIGHTS = "superres_raw.safetensors"
SR_META = "superres.json"


def load_superres(source: "Manifest | Storage | str", device: str = "cpu", ema: bool = True,
                  **sampling_overrides: Any) -> "SrStage":
    """The stage (model in eval mode on ``device``, meta, sampling = the stage's defaults with every
    non-None override applied)."""
    import safetensors.torch

    from components.superres.config import SuperResSamplingConfig
    from components.superres.model import EfficientUNet
    from components.superres.sample import SrStage

    meta = json.loads(read_output(source, SR_META))  # from a manifest: checked against its sha256
    model = EfficientUNet(**meta["model"])
    model.load_state_dict(safetensors.torch.load(read_output(source, SR_WEIGHTS if ema else SR_RAW_WEIGHTS)))
    overrides = {k: v for k, v in sampling_overrides.items() if v is not None}
    sampling = SuperResSamplingConfig(**{**meta["sampling"], **overrides})
    return SrStage(model.to(device).eval(), meta, sampling)
