"""Load a distilled student from the distill step's outputs (local or S3), safetensors only.

The step writes ``distill.safetensors`` (the EMA student), ``distill_raw.safetensors`` and
``distill.json`` (``StudentMeta``): the DiT's meta (model arguments, schedule, prediction, classes,
shapes) plus ``method``, ``guidance`` (the teacher's, folded into the student), ``native_steps`` and
the levels it samples at (see ``components.distill.sample``). Each progressive round's
``round_k/distill.json`` is the same, for that round's student. A text-conditioned teacher's student
is a ``TextDiT`` (its dit.json's ``text``), with ``text_tokenizer.json`` beside the weights for a
joint encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.dit.load import DitMeta

if TYPE_CHECKING:
    import torch

STUDENT_WEIGHTS, STUDENT_META = "distill.safetensors", "distill.json"


@dataclass(kw_only=True)
class StudentMeta(DitMeta):
    """``distill.json``: the teacher DiT's fields (a student is a DiT of the same arguments), then the step's."""

    method: str  # "progressive", "consistency_distillation" or "consistency_training"
    guidance: float  # the classifier-free guidance folded into the student (0: none)
    spacing: str  # the DDIM grids' spacing
    distill: dict[str, Any]  # the step's DistillConfig
    native_steps: int
    teacher_cfg_weight: float  # the guidance its own teacher ran at (a progressive round's: 0 after round 1)
    # a progressive round's student
    round: int | None = None
    teacher_steps: int | None = None
    teacher_levels: list[int] | None = None  # the teacher's DDIM grid, descending
    levels: list[int] | None = None  # the student's: every other teacher level
    # a consistency model
    consistency_levels: list[int] | None = None  # its discretisation, ascending
    sample_levels: list[int] | None = None  # the re-noising levels of multistep sampling

    @classmethod
    def of_teacher(cls, teacher: DitMeta, **student: Any) -> "StudentMeta":
        """The student of ``teacher`` (its fields and unknown keys kept) with the step's ``student`` fields."""
        inherited = {name: getattr(teacher, name) for name in DitMeta.field_names()}
        return cls(**inherited, **student, extra=dict(teacher.extra))


def load_student(source, device: str = "cpu", frozen_text_path: str | None = None
                 ) -> tuple["torch.nn.Module", StudentMeta]:
    """(student DiT in eval mode, meta) from a distill step's manifest (files checked against their
    sha256), or its own output Storage or URI; a ``TextDiT`` with its text encoder for a text teacher's
    student (a joint encoder over the tokenizer written beside it; a frozen one from its directory, or
    ``frozen_text_path``, a served model's bundled copy)."""
    import safetensors.torch

    from components.common.step import read_output
    from components.dit.load import with_text_encoder
    from components.dit.model import DiT

    meta = StudentMeta.read(source, STUDENT_META)
    model = DiT(**meta.model)
    if meta.text is not None:
        model = with_text_encoder(model, meta, source, frozen_text_path)
    model.load_state_dict(safetensors.torch.load(read_output(source, STUDENT_WEIGHTS)))
    return model.to(device).eval(), meta
