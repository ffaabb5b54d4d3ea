"""Load a trained DiT from the DiT step's outputs (local or S3), safetensors only.

The step writes ``dit.safetensors`` (EMA weights: what sampling uses), ``dit_raw.safetensors``
(the online weights) and ``dit.json`` (everything needed to rebuild and sample the model: the
resolved ``DiT`` arguments under ``model``, the noise schedule, prediction type, classes,
latent and image shapes; for a text DiT its encoder's config too), read back as ``DitMeta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.common.stage_meta import StageMeta
from components.common.step import read_output

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.common.storage import Storage
    from components.dit.model import DiT

DIT_WEIGHTS = "dit.safetensors"
DIT_RAW_WEIGHTS = "dit_raw.safetensors"
DIT_META = "dit.json"


@dataclass
class DitMeta(StageMeta):
    """``dit.json`` (built by ``components.dit.train.step_meta``)."""

    preset: str
    model: dict[str, Any]  # the resolved DiT arguments
    schedule: str  # the noise schedule, by name, and its length
    num_timesteps: int
    prediction: str  # "eps", "v" or "x0"
    learn_sigma: bool
    num_classes: int  # 1 for unlabelled data
    null_label: int | None  # the class-free label's id; None for a text-only DiT (no class embedding)
    latent_shape: list[int]  # [c, h, w]
    classes: list[str] | None
    image_channels: int
    image_size: int
    flops_per_image: float
    parameters: int
    data: str  # "latents" or "pixels": what it trained on
    max_steps: int
    ema_decay: float
    # the step's sampler settings, defaults for later sampling (readers fall back on the step's config)
    sampling: dict[str, Any] | None = None
    # text conditioning only (a class DiT's file has none of these)
    conditioning: str | None = None
    text: dict[str, Any] | None = None  # the TextEncoderConfig
    text_vocabulary: int | None = None  # the joint tokenizer's entries (0: a frozen encoder's own)
    grid_prompts: list[str] | None = None
    grid_labels: list[int] | None = None  # class+text: each grid prompt's class
    text_encoder_files: dict[str, str] | None = None  # a frozen encoder's files: relative path -> sha256
    # a warm start only (components.common.warm_start)
    warm_start: str | None = None
    warm_start_version: str | None = None
    warm_start_source: str | None = None

    @property
    def uses_text(self) -> bool:
        """Takes captions: text or class+text (``components.dit.config.meta_uses_text``)."""
        return self.text is not None

    @property
    def uses_classes(self) -> bool:
        """Takes class labels: class or class+text (a text-only DiT has no null label)."""
        return self.null_label is not None

    def class_names(self) -> list[str]:
        """The classes' names, or their indices as strings for an unnamed data set."""
        return [str(c) for c in (self.classes or range(self.num_classes))]


@dataclass(kw_only=True)
class SamplingFacts(StageMeta):
    """The part of dit.json that sampling a DiT reads, for a meta that holds only it: controlnet.json
    copies these facts of its DiT (``components.controlnet.train.DIT_FACTS``) and samples under them."""

    schedule: str
    num_timesteps: int
    prediction: str
    learn_sigma: bool
    num_classes: int
    null_label: int | None
    latent_shape: list[int]
    classes: list[str] | None
    image_channels: int
    image_size: int


def sampling_meta(meta: "StageMeta | dict[str, Any]") -> "DitMeta | SamplingFacts":
    """``meta`` typed for sampling: itself when typed; a dit.json's JSON form as ``DitMeta``; a form
    with only the sampling facts (a ControlNet's) as ``SamplingFacts`` (refused naming what it lacks)."""
    if isinstance(meta, StageMeta):
        return meta
    complete = all(name in meta for name in DitMeta.required_names())
    return (DitMeta if complete else SamplingFacts).from_json(meta)


def load_dit_meta(source: "Manifest | Storage | str") -> DitMeta:
    return DitMeta.read(source, DIT_META)


def load_dit(manifest: "Manifest | Storage | str", device: str = "cpu", ema: bool = True,
             frozen_text_path: str | None = None) -> tuple["DiT", DitMeta]:
    """(DiT in eval mode on ``device``, meta) from a DiT step's manifest (every file checked against
    its sha256; or the step's own output directory as a Storage or URI, before it has a manifest).
    ``ema=False`` loads the online weights instead of the EMA; ``frozen_text_path`` replaces the frozen
    text encoder's directory recorded at training (a served model's bundled copy)."""
    import safetensors.torch

    from components.dit.model import DiT

    meta = load_dit_meta(manifest)
    model = DiT(**meta.model)
    if meta.text is not None:
        model = with_text_encoder(model, meta, manifest, frozen_text_path)
    weights = safetensors.torch.load(read_output(manifest, DIT_WEIGHTS if ema else DIT_RAW_WEIGHTS))
    model.load_state_dict(weights)
    return model.to(device).eval(), meta


def with_text_encoder(dit: "DiT", meta: DitMeta, source: "Manifest | Storage | str",
                      frozen_path: str | None = None):
    """A text-conditioned DiT's ``TextDiT``: its encoder rebuilt from ``meta.text`` (a joint one over
    the tokenizer written beside the weights; a frozen one from its local directory, or ``frozen_path``
    (a served model's bundled copy), checked against the sha256 of its files recorded at training)."""
    from components.dit.text_model import TextDiT
    from components.text.config import TextEncoderConfig
    from components.text.frozen import verify_directory
    from components.text.load import TOKENIZER_FILE, build_text_encoder
    from components.text.tokenizer import WordTokenizer

    cfg = TextEncoderConfig(**meta.text)
    tokenizer = None
    if cfg.kind == "joint":
        tokenizer = WordTokenizer.from_json(read_output(source, TOKENIZER_FILE).decode("utf-8"), TOKENIZER_FILE)
    else:
        cfg = cfg.model_copy(update={"path": frozen_path or cfg.path})
        if meta.text_encoder_files is not None:
            verify_directory(cfg.path, meta.text_encoder_files, "dit.text.path")
    return TextDiT(dit, build_text_encoder(cfg, tokenizer, "dit.text"))
