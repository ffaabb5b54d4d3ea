"""Samplers: plain functions with one signature,

    sampler(denoiser, x, timesteps, schedule, *, noise=None, extra_args=None, **options)

`denoiser` is a Denoiser (denoiser.py: the network's prediction type, learned variance and thresholding) or a
bare ε-model. `timesteps` is a descending LongTensor of the training timesteps at which the model is evaluated
(e.g. `spaced_timesteps(T, S, "leading")`). `noise` is the stream every random draw comes from (noise.py; None:
torch's global generator); `extra_args` is the conditioning, passed to the model untouched. The last step goes
from `timesteps[-1]` to clean data, or to the level `stop_at` when given (then x at that noise level is
returned: truncated cascades start there). Option names are the sampling configs' field names.
The score-based samplers (annealed Langevin, predictor–corrector) are in score.py; registry.py names them all.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from components.diffusion.denoiser import ClipFn, Denoiser, ModelOutput, as_denoiser
from components.diffusion.noise import NoiseStream, batch_noise
from components.diffusion.process import p_mean_variance, predict_x0_eps, q_posterior_mean_variance, reverse_log_variance
from components.diffusion.schedule import NoiseSchedule

ModelFn = Callable[..., torch.Tensor]
ExtraArgs = dict[str, Any] | None


def check_timesteps(timesteps: torch.Tensor, schedule: NoiseSchedule, stop_at: int | None) -> list[int]:
    """The timesteps as ints, after refusing (ValueError naming them) any a sampler cannot walk."""
    steps = [int(t) for t in torch.as_tensor(timesteps).flatten()]
    if not steps or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must be a non-empty, strictly descending sequence, got {steps}")
    if steps[0] >= schedule.num_timesteps or steps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {steps}")
    if stop_at is not None and not 0 <= stop_at < steps[-1]:
        raise ValueError(f"stop_at={stop_at} must be a level below the last timestep {steps[-1]}")
    return steps


def batch_t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def new_intermediates() -> dict[str, list]:
    return {"t": [], "x_t": [], "pred_x0": []}


def record(intermediates: dict[str, list] | None, t: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
    if intermediates is not None:
        intermediates["t"].append(t)
        intermediates["x_t"].append(x)
        intermediates["pred_x0"].append(pred_x0)


def finish(x, intermediates):
    return x if intermediates is None else (x, intermediates)


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

    One step from a raw model output (2C channels with learned_variance); `t` indexes `schedule`: pass a
    `schedule.respace(...)` to step between strided timesteps.
    """
    out = p_mean_variance(
        schedule, model_output, x_t, batch_t(t, x_t), prediction, learned_variance, variance, clip_x0
    )
    x_prev = out["mean"]
    if t > 0:
        noise = batch_noise(generator)(x_t) if noise is None else noise
        x_prev = x_prev + torch.exp(0.5 * out["log_variance"]) * noise
    return x_prev, out["pred_x0"]


def ancestral_step(chain: NoiseSchedule, denoiser: Denoiser, out: ModelOutput, x: torch.Tensor, i: int,
                   noise: NoiseStream, variance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ddpm_step for a Denoiser's output at index i of the respaced `chain`; noise drawn for i > 0 only."""
    index = batch_t(i, x)
    log_variance = reverse_log_variance(chain, index, x, variance, out.variance)
    pred_x0, _ = denoiser.x0_eps(chain, out.prediction, x, index)
    mean, _, _ = q_posterior_mean_variance(chain, pred_x0, x, index)
    if i > 0:
        mean = mean + torch.exp(0.5 * log_variance) * noise(x)
    return mean, pred_x0


def _ddim_update(schedule, x_t, pred_x0, pred_eps, t, t_prev, eta, noise: torch.Tensor | None, final_alpha_cumprod):
    alpha_t = float(schedule.alphas_cumprod[t])
    alpha_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else float(final_alpha_cumprod)
    sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5
    x_prev = alpha_prev**0.5 * pred_x0 + max(1 - alpha_prev - sigma**2, 0.0) ** 0.5 * pred_eps
    return x_prev + sigma * noise if eta > 0 else x_prev


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
    pred_x0, pred_eps = predict_x0_eps(schedule, model_output, x_t, batch_t(t, x_t), prediction, clip_x0)
    if eta > 0 and noise is None:
        noise = batch_noise(generator)(x_t)
    return _ddim_update(schedule, x_t, pred_x0, pred_eps, t, t_prev, eta, noise, final_alpha_cumprod), pred_x0


@torch.no_grad()
def ddpm_sample(
    denoiser: Denoiser | ModelFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: NoiseStream | None = None,
    extra_args: ExtraArgs = None,
    fixed_variance: str = "beta_tilde",
    stop_at: int | None = None,
    return_intermediates: bool = False,
    progress: bool = False,
):
    """Ancestral sampling — Ho et al. 2020, alg. 2, on the respaced chain β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} (Nichol & Dhariwal 2021, sec. 4).

    `fixed_variance`: σ_i² = β̃_i ("beta_tilde", the posterior's, lower bound) or β_i ("beta", upper bound) of the
    respaced chain (Ho et al. 2020, sec. 3.2); a denoiser with a learned variance uses its own Σ_θ, so callers
    refuse a setting other than the default for it (components/dit/generate.py). Returns x_0 (or x at level `stop_at`);
    with return_intermediates, (x, dict(t, x_t, pred_x0 lists)).
    """
    denoiser, noise = as_denoiser(denoiser), noise or batch_noise()
    steps = check_timesteps(timesteps, schedule, stop_at)
    levels = steps[::-1] if stop_at is None else [stop_at] + steps[::-1]
    chain = schedule.respace(torch.tensor(levels))
    intermediates = new_intermediates() if return_intermediates else None
    last_index = 0 if stop_at is None else 1
    for i in tqdm(range(len(levels) - 1, last_index - 1, -1), disable=not progress, desc="ddpm"):
        out = denoiser.output(x, batch_t(levels[i], x), extra_args)
        x, pred_x0 = ancestral_step(chain, denoiser, out, x, i, noise, fixed_variance)
        record(intermediates, levels[i], x, pred_x0)
    return finish(x, intermediates)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser | ModelFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: NoiseStream | None = None,
    extra_args: ExtraArgs = None,
    eta: float = 0.0,
    final_alpha_cumprod: float = 1.0,
    stop_at: int | None = None,
    return_intermediates: bool = False,
    progress: bool = False,
):
    """DDIM sampling over `timesteps` — Song et al. 2021, eq. 12; η = 0 deterministic, η = 1 DDPM-like (eq. 16).

    Step i goes from timesteps[i] to timesteps[i+1]; the last to clean data (ᾱ = final_alpha_cumprod) or to
    `stop_at`. With η > 0 every step draws noise, the last too. Returns x (or (x, intermediates)).
    """
    denoiser, noise = as_denoiser(denoiser), noise or batch_noise()
    steps = check_timesteps(timesteps, schedule, stop_at)
    targets = steps[1:] + [-1 if stop_at is None else stop_at]
    intermediates = new_intermediates() if return_intermediates else None
    for t, t_prev in tqdm(list(zip(steps, targets)), disable=not progress, desc="ddim"):
        prediction = denoiser.output(x, batch_t(t, x), extra_args).prediction
        pred_x0, pred_eps = denoiser.x0_eps(schedule, prediction, x, batch_t(t, x))
        z = noise(x) if eta > 0 else None
        x = _ddim_update(schedule, x, pred_x0, pred_eps, t, t_prev, eta, z, final_alpha_cumprod)
        record(intermediates, t, x, pred_x0)
    return finish(x, intermediates)


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser | ModelFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    extra_args: ExtraArgs = None,
    final_alpha_cumprod: float = 1.0,
    fixed_point_iters: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM encoding x_0 → x_{timesteps[0]}, the η = 0 step of Song et al. 2021, eq. 12 run backwards (sec. 4.3).

    Each step s → t evaluates ε̂ at the target label t on the current guess of x_t (first guess: x_s, as
    diffusers' DDIMInverseScheduler); `fixed_point_iters` > 0 refines the guess so that `ddim_sample` over the
    same timesteps maps the result back to x_0 up to the solver's tolerance. Not a sampler (it runs the other
    way, draws nothing), so not in the registry; the denoiser's clip_x0 is not applied (clipping is not invertible).
    """
    denoiser = as_denoiser(denoiser)
    steps = check_timesteps(timesteps, schedule, None)
    ascending = steps[::-1]
    sources = [-1] + ascending[:-1]
    x = x0
    for s, t in tqdm(list(zip(sources, ascending)), disable=not progress, desc="ddim_invert"):
        alpha_s = float(schedule.alphas_cumprod[s]) if s >= 0 else float(final_alpha_cumprod)
        alpha_t = float(schedule.alphas_cumprod[t])
        guess = x
        for _ in range(fixed_point_iters + 1):
            prediction = denoiser.output(guess, batch_t(t, x), extra_args).prediction
            _, eps = predict_x0_eps(schedule, prediction, guess, batch_t(t, x), denoiser.prediction)
            x0_hat = (x - (1 - alpha_s) ** 0.5 * eps) / alpha_s**0.5
            guess = alpha_t**0.5 * x0_hat + (1 - alpha_t) ** 0.5 * eps
        x = guess
    return x
