"""A small CNN classifier for evaluation: its logits judge class accuracy of generated samples and
its penultimate features give a Fréchet distance where Inception features are not meaningful
(grayscale digits, small sets). One model per file, with presets."""

from __future__ import annotations

import torch
from torch import nn

from components.evaluate.presets import CLASSIFIER_PRESETS



class EvalClassifier(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths=(32, 64, 128), feature_dim: int = 128):
        super().__init__()
        layers, channels = [], in_channels
        for width in widths:  # conv, conv, halve: 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.SiLU(),
                       nn.MaxPool2d(2)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, feature_dim), nn.SiLU())
        self.logits = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))  # (N, num_classes)


def build_classifier(preset: str, in_channels: int, num_classes: int) -> EvalClassifier:
    if preset not in CLASSIFIER_PRESETS:
        raise ValueError(f"unknown classifier preset {preset!r}; choose from {sorted(CLASSIFIER_PRESETS)}")
    return EvalClassifier(in_channels, num_classes, **CLASSIFIER_PRESETS[preset])
