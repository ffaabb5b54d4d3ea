"""Load a trained DiT from the DiT step's outputs (local or S3), safetensors only.

The step writes ``dit.safetensors`` (EMA weights: what sampling uses), ``dit_raw.safetensors``
(the online weights) and ``dit.json`` (everything needed to rebuild and sample the model: the
resolved ``DiT`` arguments under ``model``, the noise schedule, prediction type, classes,
latent and image shapes).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from components.common.step import read_output

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.common.storage import Storage
    from components.dit.model import DiT

DIT_WEIGHTS = "dit.safetensors"
DIT_RAW_WEIGHTS = "dit_raw.safetensors"
DIT_META = "dit.json"


def load_dit_meta(source: "Manifest | Storage | str") -> dict[str, Any]:
    return json.loads(read_output(source, DIT_META))


def load_dit(manifest: "Manifest | Storage | str", device: str = "cpu", ema: bool = True,
             frozen_text_path: str | None = None) -> tuple["DiT", dict]:
    """(DiT in eval mode on ``device``, meta) from a DiT step's manifest (every file checked against
    its sha256; or the step's own output directory as a Storage or URI, before it has a manifest).
    ``ema=False`` loads the online weights instead of the EMA; ``frozen_text_path`` replaces the frozen
    text encoder's directory recorded at training (a served model's bundled copy)."""
    import safetensors.torch

    from components.dit.model import DiT

    meta = load_dit_meta(manifest)
    model = DiT(**meta["model"])
    if meta.get("text") is not None:
        model = with_text_encoder(model, meta, manifest, frozen_text_path)
    weights = safetensors.torch.load(read_output(manifest, DIT_WEIGHTS if ema else DIT_RAW_WEIGHTS))
    model.load_state_dict(weights)
    return model.to(device).eval(), meta


def with_text_encoder(dit: "DiT", meta: dict[str, Any], source: "Manifest | Storage | str",
                      frozen_path: str | None = None):
    """A text-conditioned DiT's ``TextDiT``: its encoder rebuilt from ``meta["text"]`` (a joint one over
    the tokenizer written beside the weights; a frozen one from its local directory, or ``frozen_path``
    (a served model's bundled copy), checked against the sha256 of its files recorded at training)."""
    from components.dit.text_model import TextDiT
    from components.text.config import TextEncoderConfig
    from components.text.frozen import verify_directory
    from components.text.load import TOKENIZER_FILE, build_text_encoder
    from components.text.tokenizer import WordTokenizer

    cfg = TextEncoderConfig(**meta["text"])
    tokenizer = None
    if cfg.kind == "joint":
        tokenizer = WordTokenizer.from_json(read_output(source, TOKENIZER_FILE).decode("utf-8"), TOKENIZER_FILE)
    else:
        cfg = cfg.model_copy(update={"path": frozen_path or cfg.path})
        if meta.get("text_encoder_files") is not None:
            verify_directory(cfg.path, meta["text_encoder_files"], "dit.text.path")
    return TextDiT(dit, build_text_encoder(cfg, tokenizer, "dit.text"))
