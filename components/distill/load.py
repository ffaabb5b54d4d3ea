"""Load a distilled student from the distill step's outputs (local or S3), safetensors only.

The step writes ``distill.safetensors`` (the EMA student), ``distill_raw.safetensors`` and
``distill.json``: the DiT's meta (model arguments, schedule, prediction, classes, shapes) plus
``method``, ``teacher_guidance``, ``native_steps`` and the levels it samples at (see
``components.distill.sample``). A text-conditioned teacher's student is a ``TextDiT`` (its dit.json's
``text``), with ``text_tokenizer.json`` beside the weights for a joint encoder.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from components.common.step import read_output

if TYPE_CHECKING:
    import torch

STUDENT_WEIGHTS, STUDENT_META = "distill.safetensors", "distill.json"


def load_student(source, device: str = "cpu", frozen_text_path: str | None = None
                 ) -> tuple["torch.nn.Module", dict[str, Any]]:
    """(student DiT in eval mode, meta) from a distill step's manifest (files checked against their
    sha256), or its own output Storage or URI; a ``TextDiT`` with its text encoder for a text teacher's
    student (a joint encoder over the tokenizer written beside it; a frozen one from its directory, or
    ``frozen_text_path``, a served model's bundled copy)."""
    import safetensors.torch

    from components.dit.load import with_text_encoder
    from components.dit.model import DiT

    meta = json.loads(read_output(source, STUDENT_META))
    model = DiT(**meta["model"])
    if meta.get("text") is not None:
        model = with_text_encoder(model, meta, source, frozen_text_path)
    model.load_state_dict(safetensors.torch.load(read_output(source, STUDENT_WEIGHTS)))
    return model.to(device).eval(), meta
