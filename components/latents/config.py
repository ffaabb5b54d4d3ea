"""Config of the latents step."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from components.common.config import StepConfig, StrictModel


class LatentsTextEncoder(StrictModel):
    """The frozen text encoder whose caption embeddings the step stores beside the latents (filled by the
    pipeline config from ``dit.text`` when ``dit.text.precompute``): a local transformers directory."""

    kind: Literal["frozen_clip", "frozen_t5"]
    path: str
    max_tokens: int = Field(..., ge=2)


class LatentsConfig(StepConfig):
    cache_added: ClassVar[dict[str, Any]] = {"text_encoder": None}

    batch_size: int = Field(256, ge=1)  # images per encoder forward
    # "mode": the posterior mean (deterministic); "sample": one draw per image, seeded by its key
    # (KL autoencoders only: a VQ encoder has no posterior to sample, and the step refuses it)
    posterior: Literal["mode", "sample"] = "mode"
    dtype: Literal["float32", "float16"] = "float32"  # storage dtype of the .npy latents (and text embeddings)
    # None: no text embeddings stored; else every caption is encoded once with this frozen encoder.
    text_encoder: LatentsTextEncoder | None = None
