"""Super-resolution U-Net in the style of Imagen's Efficient U-Net (Saharia et al. 2022, app. B).

What makes it "efficient", and is kept here:
- more residual blocks at the low resolutions (``blocks`` per level, ascending), where convolutions
  are cheap, and few at the high ones;
- skip connections scaled by 1/sqrt(2) before they join the main path;
- in the down path each level downsamples *before* its convolutions, in the up path each level
  upsamples *after* them (the high-resolution levels run fewer convolutions).

Conditioning: the low-resolution image, upsampled to the output size, is concatenated with x_t
(Ho et al. 2021, CDM); the timestep t and the conditioning-augmentation level s are embedded
alike (sinusoid + MLP) and summed, with an optional class embedding and, for a text stage
(``pooled_dim`` > 0), the caption's pooled embedding through LayerNorm + a zero-initialised linear
map (Imagen's SR models add the pooled text embedding to the timestep embedding); each residual
block gets the sum as a per-channel scale and shift (FiLM, as in improved DDPM).

The text projection starts at zero, so an untrained text stage computes exactly what the same
weights compute without text, whatever the prompt: the text is learned as a correction of a
super-resolver, never a perturbation it has to unlearn first.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from components.superres.presets import SUPERRES_PRESETS
SQRT_HALF = 1 / math.sqrt(2)



def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer levels, (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, FiLM from the conditioning embedding; 1x1 shortcut on width change."""

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(embed_dim, 2 * out_ch)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as its shortcut
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, out, H, W)
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads if channels % heads == 0 else 1
        self.norm, self.qkv, self.proj = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Level(nn.Module):
    """The residual blocks of one resolution (plus optional self-attention after them)."""

    def __init__(self, in_ch: int, out_ch: int, count: int, embed_dim: int, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(in_ch if i == 0 else out_ch, out_ch, embed_dim) for i in range(count))
        self.attention = SelfAttention(out_ch) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, emb)
        return self.attention(x)


class EfficientUNet(nn.Module):
    """The stage's prediction at ``out_size`` given (x_t, t | low_res, s[, y]): v by default, or ε, as the
    stage config's ``prediction`` says (the network is the same; only its training target differs);
    ``low_res`` at any smaller size."""

    def __init__(self, in_channels: int = 3, out_size: int = 64, channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 4), blocks: tuple[int, ...] = (1, 2, 4),
                 attention_levels: tuple[int, ...] = (), num_classes: int = 0, pooled_dim: int = 0):
        super().__init__()
        if len(channel_mults) != len(blocks):
            raise ValueError(f"channel_mults {channel_mults} and blocks {blocks} need one entry per level")
        if out_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(f"out_size {out_size} is not divisible by 2^{len(channel_mults) - 1} (the levels)")
        self.in_channels, self.out_size, self.num_classes = in_channels, out_size, num_classes
        self.channels = channels
        embed_dim = 4 * channels
        self.t_mlp = nn.Sequential(nn.Linear(channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.s_mlp = nn.Sequential(nn.Linear(channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        # Class embedding with a null row (index num_classes): label dropout makes guidance possible.
        self.y_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes else None
        widths = [channels * m for m in channel_mults]
        self.stem = nn.Conv2d(2 * in_channels, widths[0], 3, padding=1)  # x_t ++ upsampled low-res
        self.down = nn.ModuleList()
        previous = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            self.down.append(Level(previous, width, count, embed_dim, i in attention_levels))
            previous = width
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(Level(previous + widths[i], widths[i], blocks[i], embed_dim, i in attention_levels))
            previous = widths[i]
        self.head = nn.Sequential(group_norm(previous), nn.SiLU(), nn.Conv2d(previous, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        # Built last, so the other weights draw the same initial values as a stage without text.
        self.pooled_dim = pooled_dim
        self.text_proj = None
        if pooled_dim:
            self.text_proj = nn.Sequential(nn.LayerNorm(pooled_dim), nn.Linear(pooled_dim, embed_dim))
            nn.init.zeros_(self.text_proj[-1].weight)
            nn.init.zeros_(self.text_proj[-1].bias)

    @property
    def null_class_id(self) -> int:
        return self.num_classes

    def embed(self, t: torch.Tensor, noise_cond_aug_level: torch.Tensor, y: torch.Tensor | None,
              pooled: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.t_mlp[0].weight.dtype  # bf16/fp16 under DeepSpeed: the sinusoids follow the weights
        emb = (self.t_mlp(timestep_embedding(t, self.channels).to(dtype))
               + self.s_mlp(timestep_embedding(noise_cond_aug_level, self.channels).to(dtype)))
        if self.y_embed is not None:
            y = torch.full_like(t, self.num_classes) if y is None else y
            emb = emb + self.y_embed(y)
        if self.text_proj is not None:
            if pooled is None:
                raise ValueError("this super-resolution stage is text-conditioned: give the pooled text embedding "
                                 "(the empty caption's for no text)")
            emb = emb + self.text_proj(pooled.to(dtype))  # (N, Dp) -> (N, 4C)
        return emb  # (N, 4C)

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor, noise_cond_aug_level: torch.Tensor,
                y: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if low_res.shape[-1] != x.shape[-1]:
            low_res = F.interpolate(low_res, size=x.shape[-2:], mode="bilinear", align_corners=False)
        emb = self.embed(t, noise_cond_aug_level, y, pooled)
        h = self.stem(torch.cat([x, low_res.to(x.dtype)], dim=1))  # (N, C0, H, W)
        skips = []
        for i, level in enumerate(self.down):
            if i > 0:
                h = F.avg_pool2d(h, 2)  # downsample before the level's convolutions
            h = level(h, emb)
            skips.append(h)
        for i, level in enumerate(self.up):
            h = level(torch.cat([h, skips.pop() * SQRT_HALF], dim=1), emb)
            if i < len(self.up) - 1:
                h = F.interpolate(h, scale_factor=2, mode="nearest")  # upsample after them
        return self.head(h)  # (N, C, H, W)


def build_superres(preset: str, **overrides) -> EfficientUNet:
    """Build a U-Net from a SUPERRES_PRESETS key; keyword overrides replace preset or default arguments.
    The model keeps every argument it was built with as ``model.arguments``, tuples as lists (as
    superres.json records them under ``model``; ``EfficientUNet(**arguments)`` builds it again)."""
    if preset not in SUPERRES_PRESETS:
        raise ValueError(f"unknown super-resolution preset {preset!r}; valid presets: {', '.join(SUPERRES_PRESETS)}")
    # an argument EfficientUNet does not take raises TypeError here, before any weight is allocated
    bound = inspect.signature(EfficientUNet).bind(**{**SUPERRES_PRESETS[preset], **overrides})
    bound.apply_defaults()
    arguments = {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}
    model = EfficientUNet(**arguments)
    model.arguments = arguments
    return model
