"""Multistep consistency sampling (Song et al. 2023, alg. 1) with the common sampler signature.

A consistency model maps any point of a trajectory to its end, x̂_0 = f(x_t, t). Sampling evaluates it
at the top level, then alternates "re-noise x̂_0 to the next level, evaluate again". That needs nothing
but an x̂_0 prediction, so the sampler takes any denoiser: the distilled consistency student is a
``Denoiser`` whose network predicts x̂_0 (``components.distill.consistency.ConsistencyFunction.x0_model``);
an ε- or v-model gives the same "predict, then fresh noise" chain.

In the variance-exploding variables the student was trained in (σ = √((1−ᾱ)/ᾱ), x = x_t / √ᾱ), step k
re-noises as x = x̂_0 + √(σ_k² − σ_min²) z_k, σ_min the schedule's smallest level (level 0, where
f is the identity). In the VP variables every sampler here works in, that is

    x_t = √ᾱ_k x̂_0 + √(ᾱ_k (σ_k² − σ_min²)) z_k.

``x`` is the VP variable at the first timestep; for the top level of a consistency student that is
√(1−ᾱ_T) ε (its training marginal with x_0 unknown, σ_max ε in VE), which ``top_level_input`` gives.
"""

from __future__ import annotations

import torch

from components.diffusion.denoiser import Denoiser, as_denoiser
from components.diffusion.noise import NoiseStream, batch_noise
from components.diffusion.samplers import ExtraArgs, ModelFn, batch_t, check_timesteps, finish, new_intermediates, record
from components.diffusion.schedule import NoiseSchedule


def top_level_input(schedule: NoiseSchedule, noise: torch.Tensor, top: int) -> torch.Tensor:
    """The VP input at level ``top`` of a chain started from standard normal ``noise``: √(1−ᾱ_top) ε."""
    return noise * float(schedule.alphas_cumprod[top].double().neg().add(1).sqrt())


def renoise_scale(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """(√ᾱ_t, √(ᾱ_t (σ_t² − σ_min²))): the VP coefficients of x̂_0 and of the fresh draw at level t."""
    abar = schedule.alphas_cumprod.double()
    sigma_sq = (1 - abar[t]) / abar[t]
    sigma_min_sq = (1 - abar[0]) / abar[0]
    return float(abar[t].sqrt()), float((abar[t] * (sigma_sq - sigma_min_sq)).clamp_min(0).sqrt())


@torch.no_grad()
def consistency_sample(
    denoiser: Denoiser | ModelFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: NoiseStream | None = None,
    extra_args: ExtraArgs = None,
    return_intermediates: bool = False,
):
    """Multistep consistency sampling (Song et al. 2023, alg. 1): x̂_0 at each of ``timesteps``, re-noised between.

    One network evaluation per timestep; one draw per timestep after the first. Returns the last x̂_0
    (or (x̂_0, intermediates)).
    """
    denoiser, noise = as_denoiser(denoiser), noise or batch_noise()
    steps = check_timesteps(timesteps, schedule, None)
    intermediates = new_intermediates() if return_intermediates else None
    pred_x0 = x
    for k, t in enumerate(steps):
        if k:
            x0_scale, noise_scale = renoise_scale(schedule, t)
            x = x0_scale * pred_x0 + noise_scale * noise(pred_x0)
        prediction = denoiser.output(x, batch_t(t, x), extra_args).prediction
        pred_x0, _ = denoiser.x0_eps(schedule, prediction, x, batch_t(t, x))
        record(intermediates, t, x, pred_x0)
    return finish(pred_x0, intermediates)
