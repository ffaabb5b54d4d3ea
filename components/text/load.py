"""The text encoder from its config: the files it writes beside the model, and how it is rebuilt."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from torch import nn

from components.text.config import TextEncoderConfig
from components.text.frozen import FrozenTextEncoder
from components.text.model import JointTextEncoder
from components.text.tokenizer import WordTokenizer, build_tokenizer

# Beside the DiT's weights: the joint encoder's tokenizer (JSON, its sha256 in the writer's manifest).
TOKENIZER_FILE = "text_tokenizer.json"


def tokenizer_from_captions(cfg: TextEncoderConfig, captions: Iterable[str]) -> WordTokenizer:
    """The joint encoder's tokenizer over a caption stream, read once, sized by the config."""
    return build_tokenizer(captions, max_tokens=cfg.max_tokens, max_vocabulary=cfg.vocabulary,
                           min_frequency=cfg.min_word_frequency, counter_capacity=cfg.word_counter_capacity)


def build_text_encoder(cfg: TextEncoderConfig, tokenizer: WordTokenizer | None = None, section: str = "text") -> nn.Module:
    """The encoder the config names; ``section`` is where the config sits, for error messages."""
    if cfg.kind == "joint":
        if tokenizer is None:
            raise ValueError(f"{section}.kind 'joint' needs the tokenizer built from the training captions "
                             f"(tokenizer_from_captions, or {TOKENIZER_FILE} beside a trained model)")
        return JointTextEncoder(tokenizer, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
    return FrozenTextEncoder(cfg.kind, cfg.path, cfg.max_tokens, config_key=f"{section}.path")


def load_tokenizer(directory: str | Path) -> WordTokenizer:
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the joint text encoder's tokenizer is missing")
    return WordTokenizer.load(path)
