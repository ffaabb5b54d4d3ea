"""Training pairs and noise conditioning augmentation (Ho et al. 2021, Cascaded Diffusion Models, sec. 3.2).

- ``resize`` (``components.common.resample``): the one resampling of targets, low-resolution inputs
  and evaluation images, so a stage sees at sampling time the kind of input it was trained on.
- Gaussian noise augmentation: the low-resolution conditioning z is replaced by a sample of
  q(z_s | z) = N(sqrt(abar_s) z, (1 - abar_s) I) at a level s drawn per example while training, and
  s is given to the model. At sampling time s is a fixed number from the config.
- Gaussian blur augmentation: blur with a sigma drawn per example from a range, with a probability
  (CDM's choice at higher resolutions). Training only.

Levels are integer timesteps of the stage's own noise schedule (``NoiseSchedule``), so "level 0"
is the clean input and the truncated hand-off of a lower stage, stopped at step s, matches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.diffusion import NoiseSchedule, q_sample


def gaussian_kernel(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D kernels, one per sigma: (N,) -> (N, kernel_size)."""
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=sigma.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None].clamp(min=1e-6)) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur of each image with its own sigma (reflect padding); sigma 0 leaves it as is."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"blur kernel_size must be odd and positive, got {kernel_size}")
    n, c, h, w = images.shape
    kernel = gaussian_kernel(sigma.float(), kernel_size)  # (N, K)
    kernel = torch.where((sigma > 0)[:, None], kernel, F.one_hot(torch.tensor(kernel_size // 2), kernel_size).float()
                         .to(kernel.device))
    pad = kernel_size // 2
    x = images.float().reshape(1, n * c, h, w)
    weights = kernel.repeat_interleave(c, dim=0)  # (N*C, K): one filter per channel of each image
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), weights[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), weights[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


def max_level(schedule: NoiseSchedule, fraction: float) -> int:
    """The largest level of a schedule reached by ``fraction`` of it (0 -> level 0)."""
    return int(round(fraction * (schedule.num_timesteps - 1)))


def noise_augment(low_res: torch.Tensor, levels: torch.Tensor, schedule: NoiseSchedule,
                  noise: torch.Tensor) -> torch.Tensor:
    """q(z_s | z) per example; level 0 returns z unchanged (abar_0 is close to 1 but not 1)."""
    noisy = q_sample(schedule, low_res, levels, noise)
    return torch.where((levels > 0)[:, None, None, None], noisy, low_res)


def training_conditioning(low_res: torch.Tensor, schedule: NoiseSchedule, augmentation, generator: torch.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented low-res conditioning, levels (N,)) for one training batch, all draws from ``generator``.

    ``augmentation``: an ``AugmentationConfig`` (noise: enabled/max_level; blur: enabled, probability,
    kernel_size, sigma_min, sigma_max)."""
    n, device = low_res.shape[0], low_res.device
    cond = low_res
    blur = augmentation.blur
    if blur.enabled:
        sigma = blur.sigma_min + (blur.sigma_max - blur.sigma_min) * torch.rand(n, generator=generator, device=device)
        applied = torch.rand(n, generator=generator, device=device) < blur.probability
        cond = gaussian_blur(cond, torch.where(applied, sigma, torch.zeros_like(sigma)), blur.kernel_size)
    levels = torch.zeros(n, dtype=torch.long, device=device)
    if augmentation.noise.enabled and augmentation.noise.max_level > 0:
        top = max_level(schedule, augmentation.noise.max_level)
        levels = torch.randint(0, top + 1, (n,), generator=generator, device=device)
        cond = noise_augment(cond, levels, schedule, torch.randn(cond.shape, generator=generator, device=device))
    return cond, levels


def sampling_conditioning(low_res: torch.Tensor, level: int, schedule: NoiseSchedule, noise: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-truncated hand-off: the lower stage's finished output corrupted with q(z_s | z) at
    the fixed sampling level (no blur, nothing drawn here: ``noise`` comes from each sample's stream)."""
    levels = torch.full((low_res.shape[0],), int(level), dtype=torch.long, device=low_res.device)
    return noise_augment(low_res, levels, schedule, noise), levels
