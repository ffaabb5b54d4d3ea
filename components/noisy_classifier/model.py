"""A timestep-conditioned classifier of noisy latents, f(y | x_t, t).

Dhariwal & Nichol use the encoder half of their U-Net with attention pooling; at latent sizes
(8x8 to 32x32) a small residual CNN does the same job: stages of FiLM-conditioned residual blocks
(the SR U-Net's ``ResBlock``: the timestep embedding scales and shifts each block), each stage but
the last followed by a stride-2 convolution, then global average pooling and a linear read-out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.superres.model import ResBlock, group_norm, timestep_embedding

from components.noisy_classifier.presets import NOISY_CLASSIFIER_PRESETS


class NoisyClassifier(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 2), blocks: int = 2, embed_dim: int | None = None):
        super().__init__()
        embed_dim = embed_dim or 4 * channels
        self.time_dim = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        width = channels
        for level, mult in enumerate(channel_mults):
            stage = nn.ModuleList()
            for _ in range(blocks):
                stage.append(ResBlock(width, channels * mult, embed_dim))
                width = channels * mult
            self.blocks.append(stage)
            last = level == len(channel_mults) - 1
            self.downs.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.out_norm, self.head = group_norm(width), nn.Linear(width, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) of x_t (N, C, H, W) at integer timesteps t (N,)."""
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        h = self.stem(x)
        for stage, down in zip(self.blocks, self.downs):
            for block in stage:
                h = block(h, emb)
            h = down(h)
        return self.head(F.silu(self.out_norm(h)).mean(dim=(2, 3)))


def build_noisy_classifier(preset: str, in_channels: int, num_classes: int, **overrides) -> NoisyClassifier:
    """Build a classifier from a NOISY_CLASSIFIER_PRESETS key; keyword overrides replace preset values.
    The model keeps them as ``model.arguments`` (noisy_classifier.json records them under ``model``)."""
    if preset not in NOISY_CLASSIFIER_PRESETS:
        raise ValueError(f"noisy_classifier.preset: unknown preset {preset!r}; valid: "
                         f"{', '.join(NOISY_CLASSIFIER_PRESETS)}")
    arguments = {**NOISY_CLASSIFIER_PRESETS[preset], **overrides, "in_channels": in_channels,
                 "num_classes": num_classes}
    model = NoisyClassifier(**arguments)
    model.arguments = arguments
    return model
