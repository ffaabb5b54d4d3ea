"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023, "Scalable Diffusion
Models with Transformers"). Plain nn.Module: no parallelism, no I/O.

Speed notes (CPU and GPU alike; the token count of a latent DiT is small, so per-op overhead matters):
- every block's six modulations come from one Linear on SiLU(c), and SiLU(c) is computed once per
  forward and shared by all blocks and the final layer;
- modulation and the gated residuals are single fused ``torch.addcmul`` calls;
- patch tokens are made by one matmul on flattened patches, so the residual stream is contiguous
  and LayerNorm never copies its input (a transposed conv output would make it copy, both passes);
- attention is one fused qkv Linear plus ``scaled_dot_product_attention`` on strided views;
- sinusoidal frequencies and the 2-D positional embedding are precomputed buffers.

Text conditioning (issue 17; the DiT paper's cross-attention variant, PixArt-alpha) is off by default.
With ``context_dim`` each block gains a pre-norm cross-attention from the image tokens to the text
tokens between its self-attention and its MLP; with ``pooled_dim`` the pooled text embedding joins
the timestep (and the class, when both) in the adaLN-Zero vector c. Both entries start at zero (the
cross-attention's output projection and the pooled embedder's last layer), so a fresh
text-conditioned model computes exactly what the class-conditional (or, without classes, the
unconditional) model with the same shared weights computes: text enters as training moves them off
zero. With text off nothing is built, so a class-conditional model has the same parameters, in the
same order, with the same weights for the same seed as before (tests/test_dit_class_pin.py).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from components.dit.presets import DIT_PRESETS

# Defaults for the non-architecture arguments: ImageNet-256 latents (32x32x4), 1000 classes.
_DIT_DEFAULTS = dict(input_size=32, in_channels=4, num_classes=1000, class_dropout_prob=0.1, learn_sigma=True)
# Left out of model.arguments while off, so a class-conditional model's dit.json reads as before.
_TEXT_ARGUMENTS = ("context_dim", "pooled_dim")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample shift/scale broadcast over tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, (grid_size**2, dim); half the channels encode rows, half columns."""
    if dim % 4 != 0:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (G*G, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (G*G, D/2)

    # Column coordinate first, then row: the channel order facebookresearch/DiT uses.
    return torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1).float()  # (G*G, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a scalar timestep followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        half = frequency_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]  # (N, F/2)
        emb = torch.cat([angles.cos(), angles.sin()], dim=-1)  # (N, F)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (index num_classes) for the null label of CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob  # (N,)
        else:
            drop = force_drop_ids.to(device=y.device) == 1  # (N,)
        return torch.where(drop, torch.full_like(y, self.num_classes), y)  # (N,)

    def forward(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            y = self.drop_labels(y, force_drop_ids)  # (N,)
        return self.embedding_table(y)  # (N, D)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh), strided views
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from the text tokens projected to the block width."""

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(context_dim, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        length, heads = context.shape[1], self.num_heads
        q = self.q(x).view(n, t, heads, d // heads).transpose(1, 2)  # (N, H, T, Dh)
        kv = self.kv(context).view(n, length, 2, heads, d // heads)  # (N, L, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (N, H, L, Dh), strided views
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, T, Dh); padding unseen
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class PooledTextEmbedder(nn.Module):
    """Two-layer MLP from the pooled text embedding to the width of c, as the timestep's MLP."""

    def __init__(self, pooled_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled.to(self.mlp[0].weight.dtype))  # (N, D)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (N, T, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: shift/scale/gate from c, gates zero at init."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        # Text off builds nothing here, so a class-conditional block keeps its parameters and their order.
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6) if context_dim else None
        self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads) if context_dim else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        c_is_activated: bool = False,
        context: torch.Tensor | None = None,
        context_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The model passes SiLU(c) once for all blocks; a direct call with raw c activates it here.
        c = c if c_is_activated else F.silu(c)  # (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))  # (N, T, D)
        if self.cross_attn is not None:
            # Ungated, as in PixArt-alpha: the zero-initialised output projection is what starts it at zero.
            x = x + self.cross_attn(self.norm_cross(x), context, context_attn_mask)  # (N, T, D)
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c_activated: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_activated).chunk(2, dim=1)  # 2 x (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Latent DiT; forward(x, t, y, context=, context_mask=, pooled=) -> eps (and variance if learn_sigma).

    ``num_classes=None`` builds no class embedding (a text-only or unconditional model, y is None);
    ``context_dim`` adds cross-attention to text tokens of that width, ``pooled_dim`` the pooled text
    embedding in c."""

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int | None = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
    ):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim
        self.grid_size = input_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = None if num_classes is None else LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pooled_embedder = PooledTextEmbedder(pooled_dim, hidden_size) if pooled_dim else None
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class_id(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        # The patch conv is a linear map on flattened patches: initialise it like one.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the model output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        for layer in (self.final_layer.adaLN_modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.zero_text_entries()

    def zero_text_entries(self) -> None:
        """Text starts at zero: a fresh text-conditioned model ignores its text inputs (module docstring)."""
        layers = [block.cross_attn.proj for block in self.blocks if block.cross_attn is not None]
        if self.pooled_embedder is not None:
            layers.append(self.pooled_embedder.mlp[2])
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        # The stride-p conv applied as one matmul on flattened patches: same weights and result as
        # calling x_embedder, but the tokens come out contiguous. (Conv output transposed to (N, T, D)
        # is strided, every elementwise op downstream keeps those strides, and each LayerNorm then
        # copies its input, forward and backward.)
        n, c, p, g = x.shape[0], self.in_channels, self.patch_size, self.grid_size
        patches = x.view(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)  # (N, T, C*p*p)
        weight = self.x_embedder.weight.view(self.hidden_size, c * p * p)  # (D, C*p*p)
        return F.linear(patches, weight, self.x_embedder.bias)  # (N, T, D)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        n, p, g, c = x.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = x.view(n, g, g, p, p, c)  # (N, h, w, p, q, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)  # (N, C, H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``context`` (N, L, context_dim) text tokens, ``context_mask`` (N, L) bool, True where a token is
        real (None: all are), ``pooled`` (N, pooled_dim); each given exactly when the model was built for it."""
        self.check_conditioning(y, context, pooled)
        # DeepSpeed casts parameters to bf16/fp16 but leaves buffers fp32: match the activations.
        x = self.patchify(x) + self.pos_embed.to(x.dtype)  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, force_drop_ids)  # (N, D)
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(pooled)  # (N, D)
        c = F.silu(c)  # (N, D), shared by every adaLN modulation
        attn_mask = None if context is None else context_attention_mask(context, context_mask)  # (N, 1, 1, L)
        context = None if context is None else context.to(x.dtype)  # (N, L, C_text)
        for block in self.blocks:
            x = block(x, c, c_is_activated=True, context=context, context_attn_mask=attn_mask)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def check_conditioning(self, y, context, pooled) -> None:
        """Each signal is given exactly when the model has its entry: a silently ignored one is a bug."""
        for name, given, built, argument in (("y", y, self.y_embedder, "num_classes"),
                                             ("context", context, self.context_dim, "context_dim"),
                                             ("pooled", pooled, self.pooled_embedder, "pooled_dim")):
            if given is None and built is not None:
                raise ValueError(f"this DiT was built with {argument}: {name} is required")
            if given is not None and built is None:
                raise ValueError(f"this DiT was built without {argument}: it takes no {name}")


def context_attention_mask(context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA's boolean mask (True attends) over the text tokens, (N, 1, 1, L); None when every token is real."""
    if context_mask is None:
        return None
    if context_mask.shape != context.shape[:2]:
        raise ValueError(f"context_mask has shape {tuple(context_mask.shape)}, the context's tokens "
                         f"{tuple(context.shape[:2])}")
    mask = context_mask.to(device=context.device, dtype=torch.bool)  # (N, L)
    # A row with no real token would attend to nothing (NaN); the null caption still has bos and eos.
    if not bool(mask.any(dim=1).all()):
        raise ValueError("context_mask has a row with no real token; encode the empty caption for the null")
    return mask[:, None, None, :]  # (N, 1, 1, L)


def build_dit(preset: str, **overrides) -> DiT:
    """Build a DiT from a DIT_PRESETS key; keyword overrides replace preset or default arguments.
    The model keeps every argument it was built with as ``model.arguments`` (dit.json records them
    under ``model``, and ``DiT(**arguments)`` builds the same network without the presets table)."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; valid presets: {', '.join(DIT_PRESETS)}")
    # an argument DiT does not take raises TypeError here, before any weight is allocated
    bound = inspect.signature(DiT).bind(**{**_DIT_DEFAULTS, **DIT_PRESETS[preset], **overrides})
    bound.apply_defaults()
    model = DiT(**bound.arguments)
    model.arguments = {k: v for k, v in bound.arguments.items() if not (k in _TEXT_ARGUMENTS and v is None)}
    return model


def dit_flops_per_image(model: DiT, input_size: int | None = None, context_tokens: int = 0) -> int:
    """Forward matmul FLOPs (2 x multiply-accumulates) for one image, attention scores included;
    ``context_tokens`` text tokens for a text-conditioned model (the text encoder's own cost left out).

    Elementwise ops, norms and the label lookup are left out. Training costs about 3x this.
    """
    size = model.input_size if input_size is None else input_size
    d, p = model.hidden_size, model.patch_size
    tokens = (size // p) ** 2
    mlp_hidden = int(d * model.mlp_ratio)
    macs = tokens * (model.in_channels * p * p) * d  # patch embedding
    macs += model.t_embedder.frequency_dim * d + d * d  # timestep MLP
    per_block = d * 6 * d  # adaLN modulation (once per image, not per token)
    per_block += tokens * d * 3 * d  # qkv
    per_block += 2 * tokens * tokens * d  # q @ k^T and attn @ v, over all heads
    per_block += tokens * d * d  # output projection
    per_block += 2 * tokens * d * mlp_hidden  # fc1 and fc2
    if model.context_dim:  # cross-attention: q and output projection, k/v of the text, scores and values
        per_block += 2 * tokens * d * d + context_tokens * model.context_dim * 2 * d + 2 * tokens * context_tokens * d
    macs += model.depth * per_block
    macs += (model.pooled_dim * d + d * d) if model.pooled_dim else 0  # pooled text MLP
    macs += d * 2 * d + tokens * d * (p * p * model.out_channels)  # final adaLN and linear
    return 2 * macs
