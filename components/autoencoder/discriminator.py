"""PatchGAN discriminator (Isola et al. 2017, pix2pix's NLayerDiscriminator) and the GAN loss
pieces of LDM's autoencoder training: the hinge loss and the adaptive generator weight
(Esser et al. 2021, VQGAN Eq. 7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Conv stack that scores overlapping patches: (N, C, H, W) -> (N, 1, h, w) logits."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

        def norm_layer(ch: int) -> nn.Module:
            return nn.BatchNorm2d(ch) if norm == "batch" else nn.GroupNorm(math.gcd(32, ch), ch)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = base_channels
        for i in range(1, num_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False), norm_layer(out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (N, 1, h, w)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_disc_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                         disc_weight: float = 1.0, max_weight: float = 1e4) -> torch.Tensor:
    """Scale of the generator's GAN loss so its gradient at the decoder's last layer matches the
    reconstruction loss's: ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, max_weight], detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * disc_weight
