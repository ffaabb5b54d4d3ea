"""PSNR and SSIM of images against ground truth (Wang et al. 2004, the 11x11 Gaussian-window SSIM
with sigma 1.5, K1 = 0.01, K2 = 0.03), on images in [-1, 1] mapped to [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.superres.augment import gaussian_kernel


def psnr(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per image, dB; images and truth in [-1, 1], (N, C, H, W). Identical images give +inf."""
    mse = ((images.float() - truth.float()) / 2).pow(2).flatten(1).mean(1)  # on the [0, 1] scale
    return 10 * torch.log10(1.0 / mse)


def ssim(images: torch.Tensor, truth: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image mean SSIM over channels and valid window positions; inputs in [-1, 1]."""
    x, y = (images.float() + 1) / 2, (truth.float() + 1) / 2
    n, c, h, w = x.shape
    window = min(window, h, w) | 1  # odd, and no larger than the image
    k = gaussian_kernel(torch.tensor([sigma]), window)[0]
    kernel = (k[:, None] * k[None, :]).expand(c, 1, window, window)

    def blur(z):
        return F.conv2d(z, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)
