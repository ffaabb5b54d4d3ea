"""A text-conditioned super-resolution stage: the U-Net and its own text encoder as one module.

The SR stages train from the shards, beside the autoencoder/DiT branch (``pipelines.dag``), so they
cannot share the DiT's jointly trained encoder: each text stage has its own, a ``joint`` one trained
with it (over a tokenizer built from the training captions) or a frozen CLIP/T5 one. Only the pooled
embedding is used (``EfficientUNet.text_proj``), no cross-attention: the low-resolution image already
carries the layout, and the pooled text is the cheap half of Imagen's SR conditioning (ARCHITECTURE.md).

As in ``components.dit.text_model``: a joint encoder is a submodule (state dict, EMA, optimizer); a
frozen one is held outside the module tree (never trained, never copied into the checkpoints).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from components.text.frozen import FrozenTextEncoder
from components.text.model import NULL_CAPTION


class TextSuperRes(nn.Module):
    def __init__(self, unet: nn.Module, encoder: nn.Module):
        super().__init__()
        if int(getattr(unet, "pooled_dim", 0)) != int(encoder.pooled_dim):
            raise ValueError(f"the U-Net takes a pooled text embedding of width {getattr(unet, 'pooled_dim', 0)}, "
                             f"the text encoder gives {encoder.pooled_dim}")
        self.unet = unet
        if isinstance(encoder, FrozenTextEncoder):
            self._frozen = [encoder]  # a list: not registered, so not in state_dict, EMA or optimizer
            self.text_encoder = None
        else:
            self._frozen, self.text_encoder = [], encoder

    @property
    def encoder(self) -> nn.Module:
        return self._frozen[0] if self._frozen else self.text_encoder

    @property
    def null_class_id(self) -> int:
        return self.unet.null_class_id

    def encode_pooled(self, captions: list[str]) -> torch.Tensor:
        """(B, Dp) pooled embeddings of the captions, on the U-Net's device."""
        device = next(self.unet.parameters()).device
        return self.encoder(list(captions)).pooled.to(device)

    def null_pooled(self) -> torch.Tensor:
        """The empty caption's pooled embedding (1, Dp): guidance's null text."""
        return self.encode_pooled([NULL_CAPTION])

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor, noise_cond_aug_level: torch.Tensor,
                y: torch.Tensor | None = None, captions: list[str] | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """``captions`` (training: encoded now, so a joint encoder gets the gradient) or their ``pooled``
        embedding (sampling: encoded once, doubled and nulled by guidance)."""
        if (captions is None) == (pooled is None):
            raise ValueError("a text super-resolution stage takes captions or their pooled embedding (one of them)")
        if captions is not None:
            pooled = self.encode_pooled(captions)
        return self.unet(x, t, low_res, noise_cond_aug_level, y, pooled)


class StageText(NamedTuple):
    """What the SR step prepares on the driver for a text stage, before training starts."""

    tokenizer_json: str | None  # the joint encoder's vocabulary; None for a frozen encoder
    pooled_dim: int  # the U-Net's pooled_dim: the encoder's pooled width
    encoder_files: dict[str, str] | None  # a frozen encoder's {file: sha256}, checked at every load


def prepare_stage_text(cfg, shard, step: str) -> StageText:
    """The tokenizer (one verified pass over the training captions) and widths of ``cfg.text``'s encoder."""
    from components.common.data import has_captions, image_split, split_captions
    from components.text.frozen import directory_digests
    from components.text.load import build_text_encoder, tokenizer_from_captions

    if not has_captions(shard):
        raise ValueError(f"{step}: superres.text needs captions in the shards, but the shard step wrote none: set "
                         "shard.captions (sidecar, a captions file, or attributes for builtin:mnist)")
    tokenizer = None
    if cfg.text.kind == "joint":
        tokenizer = tokenizer_from_captions(cfg.text, split_captions(image_split(shard, "train", captions=True)))
    encoder = build_text_encoder(cfg.text, tokenizer, f"{step}.text")  # a probe, for its width
    return StageText(tokenizer.to_json() if tokenizer else None, int(encoder.pooled_dim),
                     None if tokenizer else directory_digests(cfg.text.path))
