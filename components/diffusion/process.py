"""The forward process q and the model's reverse step p_θ(x_{t−1}|x_t), for ε-, x0- and v-prediction."""

from __future__ import annotations

from typing import Callable

import torch

from components.diffusion.schedule import NoiseSchedule, extract

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("beta", "beta_tilde")


def _signal_and_noise_scales(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor):
    return extract(schedule.sqrt_alphas_cumprod, t, x), extract(schedule.sqrt_one_minus_alphas_cumprod, t, x)


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε — Ho et al. 2020, eq. 4."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x0)
    return signal * x0 + sigma * noise


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean μ̃_t(x_t, x_0), variance β̃_t and clipped log β̃_t of q(x_{t−1}|x_t,x_0) — Ho et al. 2020, eqs. 6–7."""
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    variance = extract(schedule.posterior_variance, t, x_t).expand_as(x_t)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    return mean, variance, log_variance


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t — Ho et al. 2020, eq. 15."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t)
    return (x_t - sigma * eps) / signal


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε = (x_t − √ᾱ_t x_0) / √(1−ᾱ_t) — Ho et al. 2020, eq. 4 solved for ε."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t)
    return (x_t - signal * x0) / sigma


def v_from_x0_eps(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t ε − √(1−ᾱ_t) x_0 — Salimans & Ho 2022, sec. 4."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x0)
    return signal * eps - sigma * x0


def x0_from_v(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_0 = √ᾱ_t x_t − √(1−ᾱ_t) v — Salimans & Ho 2022, sec. 4."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t)
    return signal * x_t - sigma * v


def eps_from_v(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ε = √(1−ᾱ_t) x_t + √ᾱ_t v — Salimans & Ho 2022, sec. 4."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t)
    return sigma * x_t + signal * v


def predict_x0_eps(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prediction: str = "eps",
    clip_x0: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from an ε/x0/v model output; with clip_x0, ε̂ is recomputed from the clipped x̂_0 (Song et al. 2021, eq. 12 needs the pair consistent)."""
    if prediction == "eps":
        eps = model_output
        x0 = predict_x0_from_eps(schedule, x_t, t, eps)
    elif prediction == "x0":
        x0 = model_output
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    elif prediction == "v":
        x0 = x0_from_v(schedule, x_t, t, model_output)
        eps = eps_from_v(schedule, x_t, t, model_output)
    else:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if clip_x0 is not None:
        x0 = clip_x0(x0)
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    return x0, eps


def p_mean_variance(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prediction: str = "eps",
    learned_variance: bool = False,
    variance: str = "beta_tilde",
    clip_x0: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """p_θ(x_{t−1}|x_t) = N(μ̃_t(x_t, x̂_0), Σ) — Ho et al. 2020 eq. 11; learned Σ by improved DDPM eq. 15.

    Fixed variance: "beta" is σ²_t = β_t, "beta_tilde" is σ²_t = β̃_t (Ho et al. sec. 3.2). Learned variance:
    model_output has 2C channels; the second half v ∈ [−1, 1] gives
    log Σ = frac·log β_t + (1−frac)·log β̃_t with frac = (v+1)/2. At t = 0, β̃_0 = 0 is replaced by β̃_1
    (improved DDPM); sampling adds no noise there, so this only matters for the decoder term of the VLB.
    Returns dict(mean, variance, log_variance, pred_x0, pred_eps), all shaped like x_t.
    """
    channels = x_t.shape[1]
    variance_output = None
    if learned_variance:
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"learned variance needs {2 * channels} output channels, got {model_output.shape[1]}")
        model_output, variance_output = model_output.split(channels, dim=1)
    log_variance = reverse_log_variance(schedule, t, x_t, variance, variance_output)
    pred_x0, pred_eps = predict_x0_eps(schedule, model_output, x_t, t, prediction, clip_x0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    return {
        "mean": mean,
        "variance": torch.exp(log_variance),
        "log_variance": log_variance,
        "pred_x0": pred_x0,
        "pred_eps": pred_eps,
    }


def reverse_log_variance(
    schedule: NoiseSchedule,
    t: torch.Tensor,
    x_t: torch.Tensor,
    variance: str = "beta_tilde",
    variance_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """log Σ of p_θ(x_{t−1}|x_t), shaped like x_t: fixed ("beta": β_t, "beta_tilde": β̃_t; Ho et al. sec. 3.2) or,
    given the model's variance half v ∈ [−1, 1], learned: frac·log β_t + (1−frac)·log β̃_t, frac = (v+1)/2
    (improved DDPM eq. 15; `variance` is then unused)."""
    if variance_output is not None:
        frac = (variance_output + 1) / 2
        return frac * extract(schedule.log_betas, t, x_t) + (1 - frac) * extract(
            schedule.posterior_log_variance_clipped, t, x_t
        )
    if variance == "beta":
        return extract(schedule.log_betas, t, x_t).expand_as(x_t)
    if variance == "beta_tilde":
        return extract(schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
