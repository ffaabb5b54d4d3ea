"""Load a trained super-resolution stage from its step's outputs (local or S3), safetensors only.

The step writes ``superres.safetensors`` (EMA weights: what sampling uses), ``superres_raw.safetensors``
(the online weights) and ``superres.json`` (the resolved ``EfficientUNet`` arguments under ``model``,
sizes, schedule, channels, classes, the stage's sampling defaults and augmentation settings), read
back as ``SuperResMeta``. A text stage records its encoder's config under ``text``: a joint encoder's
tokenizer is written beside the weights (``TOKENIZER_FILE``), a frozen one is loaded from its local
directory, checked against the sha256 of its files recorded at training (``text_encoder_files``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.common.stage_meta import StageMeta
from components.common.step import read_output

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.common.storage import Storage
    from components.superres.sample import SrStage

SR_WEIGHTS = "superres.safetensors"
SR_RAW_WEIGHTS = "superres_raw.safetensors"
SR_META = "superres.json"


@dataclass
class SuperResMeta(StageMeta):
    """``superres.json``."""

    preset: str
    model: dict[str, Any]  # the resolved EfficientUNet arguments
    input_size: int
    output_size: int
    channels: int
    schedule: str
    num_timesteps: int
    filter: str  # the resampling filter that made its low-resolution inputs
    num_classes: int  # 0: not class-conditional
    classes: list[str] | None
    prediction: str
    sampling: dict[str, Any]  # SuperResSamplingConfig: the stage's sampling defaults
    augmentation: dict[str, Any]  # its noise-conditioning augmentation settings
    parameters: int
    max_steps: int
    # a text stage only: its TextEncoderConfig (its "text_encoder_files", null for a joint encoder, stay in
    # extra: a text stage's file has the key either way, and a None field would not be written)
    text: dict[str, Any] | None = None
    # a warm start only (components.common.warm_start)
    warm_start: str | None = None
    warm_start_version: str | None = None
    warm_start_source: str | None = None


def load_superres(source: "Manifest | Storage | str", device: str = "cpu", ema: bool = True,
                  **sampling_overrides: Any) -> "SrStage":
    """The stage (model in eval mode on ``device``, meta, sampling = the stage's defaults with every
    non-None override applied)."""
    import safetensors.torch

    from components.superres.config import SuperResSamplingConfig
    from components.superres.model import EfficientUNet
    from components.superres.sample import SrStage

    meta = SuperResMeta.read(source, SR_META)  # from a manifest: checked against its sha256
    model = EfficientUNet(**meta.model)
    if meta.text is not None:
        model = with_text_encoder(model, meta, source)
    model.load_state_dict(safetensors.torch.load(read_output(source, SR_WEIGHTS if ema else SR_RAW_WEIGHTS)))
    overrides = {k: v for k, v in sampling_overrides.items() if v is not None}
    sampling = SuperResSamplingConfig(**{**meta.sampling, **overrides})
    return SrStage(model.to(device).eval(), meta, sampling)


def with_text_encoder(unet, meta: SuperResMeta, source: "Manifest | Storage | str"):
    """A text stage's ``TextSuperRes``: its encoder rebuilt from ``meta.text``."""
    from components.superres.text_model import TextSuperRes
    from components.text.config import TextEncoderConfig
    from components.text.frozen import verify_directory
    from components.text.load import TOKENIZER_FILE, build_text_encoder
    from components.text.tokenizer import WordTokenizer

    cfg = TextEncoderConfig(**meta.text)
    tokenizer = None
    if cfg.kind == "joint":
        tokenizer = WordTokenizer.from_json(read_output(source, TOKENIZER_FILE).decode("utf-8"), TOKENIZER_FILE)
    elif meta.get("text_encoder_files") is not None:
        verify_directory(cfg.path, meta["text_encoder_files"], "superres.text.path")
    return TextSuperRes(unet, build_text_encoder(cfg, tokenizer, "superres.text"))
