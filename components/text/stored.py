"""A frozen encoder's caption embeddings computed once, by the latents step, and read back by the DiT's
training (Latent Diffusion / Imagen practice: at T5-XXL scale the encoder costs more than the DiT step).

Per sample the latent shard holds ``<key>.context.npy`` (L_i, D): the final states of the caption's real
tokens only (where the tokenizer's attention mask is 1; padding is the stream's business) and
``<key>.pooled.npy`` (D,), both in the latents' ``dtype``. The null (the empty caption's encoding, what
caption dropout trains and guidance subtracts) is one step output file, ``text_null.safetensors``
(``context`` (L_0, D), ``pooled`` (D,)). The manifest's ``info["text_encoder"]`` says which encoder made
them: kind, path, max_tokens and the sha256 of every file of its directory; the DiT uses them only for
the same encoder (same kind, max_tokens and files) and refuses any other, naming both.

A token's final state does not depend on the padding after it (CLIP's causal mask, T5's attention mask),
so a caption encoded in a padded chunk here equals it encoded in any training batch, up to rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from components.text.model import NULL_CAPTION, TextEncoding

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.text.config import TextEncoderConfig

NULL_TEXT_FILE = "text_null.safetensors"
INFO_KEY = "text_encoder"  # the latents manifest's info entry


def per_caption(encoding: TextEncoding, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """A batch's encoding -> (context (L_i, D), pooled (D,)) per caption, real tokens only, in ``dtype``."""
    rows = []
    for tokens, mask, pooled in zip(encoding.tokens.float().cpu(), encoding.mask.cpu(), encoding.pooled.float().cpu()):
        rows.append((tokens[mask].numpy().astype(dtype), pooled.numpy().astype(dtype)))
    return rows


def encode_captions(encoder, captions: list[str], dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return per_caption(encoder(captions), dtype)


def null_file_bytes(encoder, dtype: str) -> bytes:
    """``text_null.safetensors``: the empty caption's (context, pooled), rounded to ``dtype`` like every caption."""
    from safetensors.torch import save

    ((context, pooled),) = encode_captions(encoder, [NULL_CAPTION], dtype)
    return save({"context": torch.from_numpy(context), "pooled": torch.from_numpy(pooled)})


def read_null(manifest: "Manifest") -> tuple[torch.Tensor, torch.Tensor]:
    """(context float32 (L_0, D), pooled float32 (D,)) of the null, its sha256 checked against the manifest."""
    from safetensors.torch import load

    from components.common.step import read_output

    tensors = load(read_output(manifest, NULL_TEXT_FILE))
    return tensors["context"].float(), tensors["pooled"].float()


def encoder_record(kind: str, path: str, max_tokens: int, files: dict[str, str], context_dim: int) -> dict[str, Any]:
    return {"kind": kind, "path": path, "max_tokens": max_tokens, "files": files, "context_dim": context_dim,
            "null": NULL_TEXT_FILE}


def stored_record(manifest: "Manifest | None") -> dict[str, Any] | None:
    """The latents manifest's record of the encoder that made its stored embeddings; None without any."""
    return None if manifest is None else manifest.info.get(INFO_KEY)


def check_same_encoder(record: dict[str, Any], text: "TextEncoderConfig", files: dict[str, str], step: str) -> None:
    """Refuse stored embeddings made by another encoder than dit.text's, naming both."""
    differs = [name for name, mine in (("kind", text.kind), ("max_tokens", text.max_tokens), ("files", files))
               if record.get(name) != mine]
    if differs:
        raise ValueError(f"step {step}: its text embeddings were made by the {record.get('kind')} encoder at "
                         f"{record.get('path')!r} (max_tokens {record.get('max_tokens')}), not by dit.text's "
                         f"{text.kind} encoder at {text.path!r} (max_tokens {text.max_tokens}): their {', '.join(differs)} "
                         "differ; re-run the latents step for dit.text's encoder (dit.text.precompute) or use its one")


def with_null(context: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, drop: torch.Tensor,
              null: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DiT's text arguments with each dropped row (``drop`` 1) replaced by the null encoding."""
    null_context, null_pooled = (part.to(context.device) for part in null)
    length = max(context.shape[1], len(null_context))
    if length > context.shape[1]:  # the null is longer than every caption of the batch: pad the batch to it
        context = torch.nn.functional.pad(context, (0, 0, 0, length - context.shape[1]))
        mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
    dropped = drop.bool().to(context.device)
    context, mask, pooled = context.clone(), mask.clone(), pooled.clone()
    context[dropped] = 0.0
    context[dropped, :len(null_context)] = null_context.to(context.dtype)
    mask[dropped] = False
    mask[dropped, :len(null_context)] = True
    pooled[dropped] = null_pooled.to(pooled.dtype)
    return {"context": context, "context_mask": mask, "pooled": pooled}
