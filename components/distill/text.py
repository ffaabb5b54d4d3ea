"""Distilling a text-conditioned teacher (issue 17): the student's text encoder, and what every network
of the step is called with.

The teacher is the DiT step's ``TextDiT``; the student is a ``TextDiT`` too, and its text encoder starts
as the teacher's:

- a joint encoder (trained with the DiT) is copied with the rest of the teacher's weights and trained
  with the student, as part of it. Guidance is folded into the student (the guided teacher at w is the
  target; the student samples with one evaluation per step and no unconditional pass), and the guided
  output (1 + w) f(c) - w f(null) is a different function of the caption than the teacher's conditional
  one: the encoder is part of the conditional network that has to absorb it, so the student is the
  teacher's whole network, copied and trained (Salimans & Ho 2022 and Meng et al. 2023 start the
  student as a copy of the teacher and train all of it). It keeps the teacher's tokenizer (the
  vocabulary does not move), exported beside the student's weights. The consistency target network
  theta- is an EMA of all of it, encoder included.
- a frozen pretrained encoder (CLIP, T5) stays frozen and outside the module tree, as in the DiT step:
  teacher, student and target share one copy per worker.

No caption dropout: as for class labels (the class student is trained with no label dropout either),
the student samples at w = 0 with the guidance folded in, so no method here calls its unconditional
branch; the teacher's unconditional half is the DiT's own null caption (its ``null_text``).
"""

from __future__ import annotations

from typing import Any

import torch

from components.common.step import Manifest, read_output
from components.dit.load import DitMeta

# The functions below take a teacher's or student's meta, typed or in the file's form (the training
# tasks carry the file's form to their workers).
AnyMeta = DitMeta | dict[str, Any]


def uses_text(meta: AnyMeta) -> bool:
    """Whether the teacher (and so the student) is text-conditioned: its dit.json records ``text``."""
    return DitMeta.of(meta).text is not None


def joint_encoder(meta: AnyMeta) -> bool:
    text = DitMeta.of(meta).text
    return text is not None and text["kind"] == "joint"


def teacher_tokenizer(dit: Manifest, meta: AnyMeta) -> str | None:
    """The joint encoder's tokenizer JSON, read (and checked against its sha256) from the DiT step's
    output; None for a class or frozen-encoder teacher."""
    from components.text.load import TOKENIZER_FILE

    if not joint_encoder(meta):
        return None
    return read_output(dit, TOKENIZER_FILE).decode("utf-8")


def text_encoder(meta: AnyMeta, tokenizer_json: str | None) -> torch.nn.Module:
    """A fresh text encoder as the teacher's was built (a joint one over ``tokenizer_json``)."""
    from components.text.config import TextEncoderConfig
    from components.text.load import build_text_encoder
    from components.text.tokenizer import WordTokenizer

    cfg = TextEncoderConfig(**DitMeta.of(meta).text)
    tokenizer = WordTokenizer.from_json(tokenizer_json) if tokenizer_json else None
    return build_text_encoder(cfg, tokenizer, "dit.text")


def labels_of(batch: dict, meta: AnyMeta) -> torch.Tensor | None:
    """The batch's class labels for a model with a class embedding (a null label), else None."""
    if DitMeta.of(meta).null_label is None:
        return None
    return batch["label"].long().clamp(min=0)


def student_conditions(y: torch.Tensor | None, captions: list[str] | None) -> dict[str, Any]:
    """The student's (and theta-'s) keyword arguments beside (x, t, y): never the DiT's own random label
    dropout (on in train mode), and the captions, which it encodes with its own encoder (the gradient
    reaches a joint one)."""
    conditions: dict[str, Any] = {}
    if y is not None:
        conditions["force_drop_ids"] = torch.zeros_like(y)
    if captions is not None:
        conditions["captions"] = list(captions)
    return conditions
