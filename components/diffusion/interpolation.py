"""Interpolation in x_T — Song et al. 2021 (DDIM), sec. 5.3: with η = 0 the sampler is a fixed map x_T → x_0,
so a path between two latents x_T^(0) and x_T^(1) gives a path between their images. The path is spherical
(slerp), as theirs: x_T is close to the sphere of radius sqrt(d) a Gaussian lives on, and a straight line
between two such points passes through atypically short vectors (the midpoint of two independent draws has
norm about sqrt(d/2)), whose images are washed out.
"""

from __future__ import annotations

import torch

PARALLEL = 1e-6  # below this angle the two vectors are parallel: the linear path is the spherical one


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """sin((1−α)θ)/sin θ · a + sin(αθ)/sin θ · b per sample (dim 0), θ the angle between a and b flattened
    (Shoemake 1985). α = 0 and α = 1 return a and b themselves, exactly."""
    if a.shape != b.shape:
        raise ValueError(f"slerp of tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha == 0.0:
        return a.clone()
    if alpha == 1.0:
        return b.clone()
    flat_a, flat_b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cosine = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp(min=1e-30)
    theta = torch.arccos(cosine.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    parallel = sin_theta < PARALLEL
    safe = torch.where(parallel, torch.ones_like(sin_theta), sin_theta)
    weight_a = torch.where(parallel, torch.full_like(theta, 1 - alpha), torch.sin((1 - alpha) * theta) / safe)
    weight_b = torch.where(parallel, torch.full_like(theta, alpha), torch.sin(alpha * theta) / safe)
    mixed = weight_a[:, None] * flat_a + weight_b[:, None] * flat_b
    return mixed.reshape(a.shape).to(a.dtype)


def frame_alphas(frames: int) -> list[float]:
    """``frames`` evenly spaced α from 0 to 1, both ends included."""
    if frames < 2:
        raise ValueError(f"an interpolation needs at least 2 frames (its two ends), got {frames}")
    return [k / (frames - 1) for k in range(frames)]


def interpolation_path(x_a: torch.Tensor, x_b: torch.Tensor, frames: int) -> torch.Tensor:
    """The ``frames`` latents of the spherical path from x_a to x_b (one sample each, shaped (1, …)):
    (frames, …), the first x_a and the last x_b exactly."""
    if x_a.shape[0] != 1 or x_b.shape[0] != 1:
        raise ValueError(f"interpolation ends are one sample each, (1, ...), got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    return torch.cat([slerp(x_a, x_b, alpha) for alpha in frame_alphas(frames)])
