"""The jointly trained text encoder tau_theta (LDM's text-to-image model: a transformer over the caption's
tokens, trained from scratch with the denoiser), its output triple, and caption dropout.

Every encoder, joint or frozen, is called on a list of captions and returns a ``TextEncoding``. The null
condition of classifier-free guidance is the encoding of the empty caption, "" (``NULL_CAPTION``): for the
joint encoder that is bos, eos; so the null is learned through those two tokens' embeddings and the
blocks, and it is exactly what caption dropout feeds in training (``drop_captions`` puts "" in place of
a caption) and what guidance's unconditional half receives (``encoder.null(n)``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from components.text.tokenizer import WordTokenizer

NULL_CAPTION = ""


class TextEncoding(NamedTuple):
    """tokens (B, L, D), mask (B, L) bool (True on real tokens), pooled (B, Dp)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def extra_args(self) -> dict[str, torch.Tensor]:
        """The DiT's keyword arguments, as a sampler's ``extra_args`` carries them."""
        return {"context": self.tokens, "context_mask": self.mask, "pooled": self.pooled}


def drop_captions(captions: list[str], probability: float, generator: torch.Generator | None = None) -> list[str]:
    """Each caption replaced by the null (empty) caption with ``probability``; deterministic given a generator."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"caption_dropout must lie in [0, 1], got {probability}")
    drop = torch.rand(len(captions), generator=generator) < probability  # (B,)
    return [NULL_CAPTION if dropped else caption for caption, dropped in zip(captions, drop.tolist())]


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)


class TextBlock(nn.Module):
    """Pre-norm transformer block; padding tokens are never attended to."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(), nn.Linear(int(width * mlp_ratio), width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, Dh)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, length, d))  # (B, L, D)
        return x + self.mlp(self.norm2(x))  # (B, L, D)


class JointTextEncoder(nn.Module):
    """Token + learned position embeddings, ``depth`` pre-norm blocks with a padding mask, a final LayerNorm.

    pooled is the masked mean of the output tokens: the encoder is bidirectional, so the eos token has
    no privileged view (CLIP pools at eos because its causal mask makes eos the only token that sees the
    whole caption), and a mean gives every word a direct gradient path from the adaLN vector."""

    def __init__(self, tokenizer: WordTokenizer, width: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"text encoder width {width} is not divisible by heads {heads}")
        self.tokenizer = tokenizer
        self.width = width
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(tokenizer.max_tokens, width))
        self.blocks = nn.ModuleList(TextBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    @property
    def context_dim(self) -> int:
        return self.width

    @property
    def pooled_dim(self) -> int:
        return self.width

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, L, D)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): keys that are real tokens
        for block in self.blocks:
            x = block(x, attn_mask)  # (B, L, D)
        tokens = self.norm_final(x)  # (B, L, D)
        return TextEncoding(tokens, mask, masked_mean(tokens, mask))  # pooled (B, D)

    def forward(self, captions: list[str]) -> TextEncoding:
        ids, mask = self.tokenizer.encode_batch(captions)  # (B, L), (B, L)
        device = self.token_embedding.weight.device
        return self.encode_ids(ids.to(device), mask.to(device))

    def null(self, batch_size: int = 1) -> TextEncoding:
        """The null condition: the empty caption's encoding, ``batch_size`` rows."""
        return self([NULL_CAPTION] * batch_size)
