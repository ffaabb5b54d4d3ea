"""Samplers: plain functions `sampler(model_fn, x, timesteps, schedule, *, generator=None, **options)`.

`model_fn(x_t, t_batch)` returns the (already guided) model output for training timesteps `t_batch`.
`timesteps` is a descending LongTensor of the training timesteps at which the model is evaluated
(e.g. `spaced_timesteps(T, S, "leading")`). The last step goes from `timesteps[-1]` to clean data, or to the
level `stop_at` when given (then x at that noise level is returned: truncated cascades start there).
The score-based samplers (annealed Langevin, predictor–corrector) are in score.py; SAMPLERS (package) names them all.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from components.diffusion.process import p_mean_variance, predict_x0_eps
from components.diffusion.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ClipFn = Callable[[torch.Tensor], torch.Tensor] | None


def _check_timesteps(timesteps: torch.Tensor, schedule: NoiseSchedule, stop_at: int | None) -> list[int]:
    steps = [int(t) for t in torch.as_tensor(timesteps).flatten()]
    if not steps or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError("timesteps must be a non-empty, strictly descending sequence")
    if steps[0] >= schedule.num_timesteps or steps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}]")
    if stop_at is not None and not 0 <= stop_at < steps[-1]:
        raise ValueError(f"stop_at={stop_at} must be a level below the last timestep {steps[-1]}")
    return steps


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _batch_t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def ddpm_step(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    learned_variance: bool = False,
    variance: str = "beta_tilde",
    clip_x0: ClipFn = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t−1} = μ_θ(x_t, t) + σ_t z, no noise at t = 0 — Ho et al. 2020, alg. 2. Returns (x_{t−1}, x̂_0).

    `t` indexes `schedule`; pass a `schedule.respace(...)` to step between strided timesteps.
    """
    out = p_mean_variance(
        schedule, model_output, x_t, _batch_t(t, x_t), prediction, learned_variance, variance, clip_x0
    )
    x_prev = out["mean"]
    if t > 0:
        noise = _noise_like(x_t, generator) if noise is None else noise
        x_prev = x_prev + torch.exp(0.5 * out["log_variance"]) * noise
    return x_prev, out["pred_x0"]


def ddim_step(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    clip_x0: ClipFn = None,
    final_alpha_cumprod: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t_prev} = √ᾱ_prev x̂_0 + √(1−ᾱ_prev−σ²) ε̂ + σ z — Song et al. 2021, eq. 12 with σ_t(η) of eq. 16.

    t_prev < 0 means clean data, ᾱ_prev = final_alpha_cumprod (1 in the paper; diffusers' set_alpha_to_one=False
    is ᾱ_0). With η > 0 noise is drawn on every step, also the last, so generator streams match diffusers.
    Returns (x_{t_prev}, x̂_0).
    """
    alpha_t = float(schedule.alphas_cumprod[t])
    alpha_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else float(final_alpha_cumprod)
    pred_x0, pred_eps = predict_x0_eps(schedule, model_output, x_t, _batch_t(t, x_t), prediction, clip_x0)
    sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5
    x_prev = alpha_prev**0.5 * pred_x0 + max(1 - alpha_prev - sigma**2, 0.0) ** 0.5 * pred_eps
    if eta > 0:
        noise = _noise_like(x_t, generator) if noise is None else noise
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def _finish(x, intermediates, return_intermediates):
    return (x, intermediates) if return_intermediates else x


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    learned_variance: bool = False,
    variance: str = "beta_tilde",
    clip_x0: ClipFn = None,
    stop_at: int | None = None,
    return_intermediates: bool = False,
    progress: bool = False,
):
    """Ancestral sampling — Ho et al. 2020, alg. 2, on the respaced chain β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} (Nichol & Dhariwal 2021, sec. 4).

    Returns x_0 (or x at level `stop_at`); with return_intermediates, (x, dict(t, x_t, pred_x0 lists)).
    """
    steps = _check_timesteps(timesteps, schedule, stop_at)
    levels = steps[::-1] if stop_at is None else [stop_at] + steps[::-1]
    chain = schedule.respace(torch.tensor(levels))
    intermediates = {"t": [], "x_t": [], "pred_x0": []}
    last_index = 0 if stop_at is None else 1
    for i in tqdm(range(len(levels) - 1, last_index - 1, -1), disable=not progress, desc="ddpm"):
        model_output = model_fn(x, _batch_t(levels[i], x))
        x, pred_x0 = ddpm_step(
            chain, model_output, x, i, generator=generator, prediction=prediction,
            learned_variance=learned_variance, variance=variance, clip_x0=clip_x0,
        )
        if return_intermediates:
            intermediates["t"].append(levels[i])
            intermediates["x_t"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return _finish(x, intermediates, return_intermediates)


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    learned_variance: bool = False,
    clip_x0: ClipFn = None,
    eta: float = 0.0,
    final_alpha_cumprod: float = 1.0,
    stop_at: int | None = None,
    return_intermediates: bool = False,
    progress: bool = False,
):
    """DDIM sampling over `timesteps` — Song et al. 2021, eq. 12; η = 0 deterministic, η = 1 DDPM-like (eq. 16).

    Step i goes from timesteps[i] to timesteps[i+1]; the last to clean data (ᾱ = final_alpha_cumprod) or to
    `stop_at`. Returns x (or (x, intermediates) with return_intermediates).
    """
    steps = _check_timesteps(timesteps, schedule, stop_at)
    targets = steps[1:] + [-1 if stop_at is None else stop_at]
    intermediates = {"t": [], "x_t": [], "pred_x0": []}
    channels = x.shape[1]
    for t, t_prev in tqdm(list(zip(steps, targets)), disable=not progress, desc="ddim"):
        model_output = model_fn(x, _batch_t(t, x))
        if learned_variance:
            model_output = model_output[:, :channels]
        x, pred_x0 = ddim_step(
            schedule, model_output, x, t, t_prev, eta=eta, generator=generator, prediction=prediction,
            clip_x0=clip_x0, final_alpha_cumprod=final_alpha_cumprod,
        )
        if return_intermediates:
            intermediates["t"].append(t)
            intermediates["x_t"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return _finish(x, intermediates, return_intermediates)


@torch.no_grad()
def ddim_invert(
    model_fn: ModelFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: str = "eps",
    learned_variance: bool = False,
    final_alpha_cumprod: float = 1.0,
    fixed_point_iters: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM encoding x_0 → x_{timesteps[0]}, the η = 0 step of Song et al. 2021, eq. 12 run backwards (sec. 4.3).

    Each step s → t evaluates ε̂ at the target label t on the current guess of x_t (first guess: x_s, as
    diffusers' DDIMInverseScheduler); `fixed_point_iters` > 0 refines the guess so that `ddim_sample` over the
    same timesteps maps the result back to x_0 up to the solver's tolerance.
    """
    steps = _check_timesteps(timesteps, schedule, None)
    ascending = steps[::-1]
    sources = [-1] + ascending[:-1]
    x = x0
    channels = x0.shape[1]
    for s, t in tqdm(list(zip(sources, ascending)), disable=not progress, desc="ddim_invert"):
        alpha_s = float(schedule.alphas_cumprod[s]) if s >= 0 else float(final_alpha_cumprod)
        alpha_t = float(schedule.alphas_cumprod[t])
        guess = x
        for _ in range(fixed_point_iters + 1):
            model_output = model_fn(guess, _batch_t(t, x))
            if learned_variance:
                model_output = model_output[:, :channels]
            _, eps = predict_x0_eps(schedule, model_output, guess, _batch_t(t, x), prediction)
            x0_hat = (x - (1 - alpha_s) ** 0.5 * eps) / alpha_s**0.5
            guess = alpha_t**0.5 * x0_hat + (1 - alpha_t) ** 0.5 * eps
        x = guess
    return x

