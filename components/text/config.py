"""The text encoder's config section (issue 17): which encoder, its size, its tokenizer, caption dropout."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from components.common.config import StrictModel

TEXT_ENCODER_KINDS = ("joint", "frozen_clip", "frozen_t5")


class TextEncoderConfig(StrictModel):
    """``joint``: a small transformer trained from scratch with the DiT over a tokenizer built from the
    training captions (LDM's text-to-image model). ``frozen_clip`` / ``frozen_t5``: CLIP's text tower or
    T5's encoder loaded from the local directory ``path`` (a transformers ``save_pretrained`` directory
    with its tokenizer), never downloaded, never trained."""

    cache_added: ClassVar[dict[str, Any]] = {"precompute": False}

    kind: Literal["joint", "frozen_clip", "frozen_t5"] = "joint"
    path: str | None = None
    # The joint encoder's architecture.
    width: int = Field(256, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    # Tokens per caption, bos and eos included (a longer caption is truncated): the joint encoder's
    # position table, and the frozen tokenizer's truncation length.
    max_tokens: int = Field(32, ge=2)
    # The joint tokenizer: at most this many entries (the 4 specials included), words seen at least
    # min_word_frequency times, counted in at most word_counter_capacity distinct words while streaming.
    vocabulary: int = Field(4096, ge=5)
    min_word_frequency: int = Field(1, ge=1)
    word_counter_capacity: int = Field(100_000, ge=2)
    # The fraction of training captions replaced by the empty caption, the null condition of
    # classifier-free guidance.
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # A frozen encoder only: the latents step encodes every caption once and stores the embeddings beside
    # the latents; the DiT trains from them without loading the encoder (sampling still encodes prompts).
    precompute: bool = False

    @model_validator(mode="after")
    def _path_matches_kind(self) -> "TextEncoderConfig":
        if self.kind != "joint" and not self.path:
            raise ValueError(f"kind {self.kind!r} loads a frozen encoder from a local directory: set path")
        if self.kind == "joint" and self.path:
            raise ValueError("path names a frozen encoder's directory; kind 'joint' trains its own (drop path)")
        if self.kind == "joint" and self.precompute:
            raise ValueError("precompute stores a frozen encoder's embeddings; the joint encoder trains with the "
                             "DiT, so its embeddings change every step (drop precompute or use a frozen kind)")
        if self.kind == "joint" and self.width % self.heads != 0:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self
