"""The model as every sampler sees it: one wrapper that knows the network's conventions.

A network returns ε, x̂_0 or v (``prediction``), maybe with a learned variance in a second half of its
channels (``learned_variance``, improved DDPM), and sampling may threshold x̂_0 (``clip_x0``). Samplers
never look at those conventions: they call the wrapper, which splits the variance off in one place and
turns the prediction into the (x̂_0, ε̂) pair the step formulas need (k-diffusion's ``external.py`` plays
this part there).

Conditioning is not the wrapper's business either: ``extra_args`` (class labels now, text or a control
image later) goes to ``model(x_t, t, **extra_args)`` untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from components.diffusion.process import PREDICTIONS, predict_x0_eps
from components.diffusion.schedule import NoiseSchedule, extract

ClipFn = Callable[[torch.Tensor], torch.Tensor] | None


class ModelOutput(NamedTuple):
    """The network's output split: the prediction (C channels) and the learned-variance half or None."""

    prediction: torch.Tensor
    variance: torch.Tensor | None


@dataclass(frozen=True)
class Denoiser:
    """``model(x_t, t, **extra_args)`` with its parameterisation; ``t`` are training timesteps (B,)."""

    model: Callable[..., torch.Tensor]
    prediction: str = "eps"
    learned_variance: bool = False
    clip_x0: ClipFn = None

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {PREDICTIONS}")

    def output(self, x: torch.Tensor, t: torch.Tensor, extra_args: dict[str, Any] | None = None) -> ModelOutput:
        """The model's output at (x, t), its learned-variance half split off."""
        out = self.model(x, t, **(extra_args or {}))
        if not self.learned_variance:
            return ModelOutput(out, None)
        channels = x.shape[1]
        if out.shape[1] != 2 * channels:
            raise ValueError(f"learned variance needs {2 * channels} output channels, got {out.shape[1]}")
        prediction, variance = out.split(channels, dim=1)
        return ModelOutput(prediction, variance)

    def x0_eps(self, schedule: NoiseSchedule, prediction: torch.Tensor, x: torch.Tensor,
               t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) from the prediction half, x̂_0 thresholded when clip_x0 is set. ``t`` indexes
        ``schedule``: a respaced chain's indices for the DDPM samplers, whose coefficients come from it."""
        return predict_x0_eps(schedule, prediction, x, t, self.prediction, self.clip_x0)

    def score(self, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor,
              extra_args: dict[str, Any] | None = None) -> torch.Tensor:
        """s_θ(x_t, t) = −ε̂ / √(1−ᾱ_t): the network as a score model (the variance half plays no part)."""
        _, eps = self.x0_eps(schedule, self.output(x, t, extra_args).prediction, x, t)
        return score_from_eps(schedule, eps, x, t)


def score_from_eps(schedule: NoiseSchedule, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∇ log q_t(x_t) ≈ −ε̂ / √(1−ᾱ_t) — denoising score matching (Vincent 2011), VP marginal q_t."""
    return -eps / extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)


def as_denoiser(model: Denoiser | Callable[..., torch.Tensor]) -> Denoiser:
    """A Denoiser as is; a bare ``model(x_t, t, **extra_args)`` as an ε-model without learned variance."""
    return model if isinstance(model, Denoiser) else Denoiser(model)
