"""Score-based samplers on a DDPM (VP) model: annealed Langevin dynamics and predictor–corrector.

Same signature as samplers.py: `sampler(denoiser, x, timesteps, schedule, *, noise=None, extra_args=None, **options)`,
with `timesteps` the descending training timesteps that serve as noise levels. An ε-, x0- or v-network is already a
score network: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε makes ∇ log q_t(x_t) = −E[ε | x_t] / √(1−ᾱ_t); nothing is retrained.

Randomness: every draw comes from the `noise` stream (noise.py). No sample's result depends on the others in its
batch (see snr_step_size), so per-sample noise streams make every sample independent of the batch size.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from components.diffusion.denoiser import ClipFn, Denoiser, as_denoiser, score_from_eps
from components.diffusion.noise import NoiseStream, batch_noise
from components.diffusion.process import predict_x0_eps
from components.diffusion.samplers import (
    ExtraArgs, ModelFn, ancestral_step, batch_t, check_timesteps, finish, new_intermediates, record,
)
from components.diffusion.schedule import NoiseSchedule

PREDICTORS = ("ancestral", "reverse_diffusion")


def score_from_model_output(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    prediction: str = "eps",
    clip_x0: ClipFn = None,
) -> torch.Tensor:
    """s_θ(x_t, t) = −ε̂ / √(1−ᾱ_t) ≈ ∇ log q_t(x_t) — denoising score matching (Vincent 2011), VP marginal q_t.

    ε̂ comes from any prediction type through predict_x0_eps; with clip_x0 it is the ε̂ of the clipped x̂_0.
    """
    t = batch_t(t, x_t) if isinstance(t, int) else t
    _, eps = predict_x0_eps(schedule, model_output, x_t, t, prediction, clip_x0)
    return score_from_eps(schedule, eps, x_t, t)


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))  # (B, 1, …, 1)


def snr_step_size(score: torch.Tensor, snr: float, alpha: float = 1.0) -> torch.Tensor:
    """ε = 2α (r ‖z‖ / ‖s‖)² per sample, ‖z‖ = √d — Song et al. 2021, corrector algorithm (α = 1 − β_t for VP).

    It makes ‖ε s‖ / ‖√(2ε) z‖ ≈ r√α: the step follows the score's scale, which the classic σ²-rule only guesses.
    The reference code (score_sde) takes batch means of ‖z‖ and ‖s‖, which ties each sample to its batch; here ‖s‖
    is the sample's own and ‖z‖ its expectation √d (d numbers per sample), what that batch mean estimates. Not the
    sample's own ‖z‖: a step that grows with the noise it scales inflates the variance (one Langevin level on
    N(0, 1), d = 64, r = 0.16: +9% with the own ‖z‖, +6% with √d, +3% from the discretisation alone).
    """
    numel = score[0].numel()
    return 2 * alpha * (snr * numel**0.5 / _per_sample_norm(score)) ** 2


def langevin_step(x: torch.Tensor, score: torch.Tensor, noise: torch.Tensor, step_size: float | torch.Tensor):
    """x + ε s + √(2ε) z — one unadjusted Langevin step (Song & Ermon 2019, sec. 2.2; their ε/2 written ε)."""
    return x + step_size * score + (2 * step_size) ** 0.5 * noise


def _tweedie_x0(schedule: NoiseSchedule, x: torch.Tensor, score: torch.Tensor, t: int) -> torch.Tensor:
    # E[x_0 | x_t] = (x_t + (1−ᾱ_t) ∇ log q_t(x_t)) / √ᾱ_t (Tweedie), the same x̂_0 as predict_x0_eps.
    alpha_bar = float(schedule.alphas_cumprod[t])
    return (x + (1 - alpha_bar) * score) / alpha_bar**0.5


@torch.no_grad()
def langevin_sample(
    denoiser: Denoiser | ModelFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: NoiseStream | None = None,
    extra_args: ExtraArgs = None,
    langevin_steps: int = 5,
    snr: float = 0.16,
    langevin_step_size: float | None = None,
    return_intermediates: bool = False,
    progress: bool = False,
):
    """Annealed Langevin dynamics over the noise levels `timesteps` — Song & Ermon 2019, alg. 1, on a VP model.

    Level t targets q_t, the law of x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε that the model was trained on; its score is
    score_from_model_output. `langevin_steps` steps x ← x + ε_t s + √(2ε_t) z run at each level, then x carries over
    unchanged to the next (alg. 1; no predictor moves it, which is what separates this from pc_sample). It is not
    rescaled by √(ᾱ_next/ᾱ_t), as the VE picture x_t/√ᾱ_t = x_0 + σ̃ ε would suggest: consecutive VP marginals
    both have about unit variance, and that rescaling inflates it by ᾱ_next/ᾱ_t for the chain to undo (×1.27 to
    ×1.49 per level at the top of a 50-level grid; far more under the cosine schedule, whose ᾱ_T is ~0).

    Step size ε_t: by default the signal-to-noise rule (snr_step_size, α = 1 − β_t). With `langevin_step_size` c, the
    classic ε_t = c·σ_t², σ_t² = 1 − ᾱ_t the level's noise variance: alg. 1's α_i = ε σ_i²/σ_L² is 2ε_t, so
    c = ε/(2σ_L²), the same rule with a constant that does not depend on the last level.
    The result is Tweedie's x̂_0 at the last level (Song & Ermon's "denoise"), one more model call: S·n + 1 in all.
    Returns x_0, or (x_0, dict(t, x_t, pred_x0 lists)) with return_intermediates: x after each level's steps.
    """
    denoiser, noise = as_denoiser(denoiser), noise or batch_noise()
    steps = check_timesteps(timesteps, schedule, None)
    if langevin_steps < 1:
        raise ValueError(f"langevin_steps must be at least 1, got {langevin_steps}")
    intermediates = new_intermediates() if return_intermediates else None
    for t in tqdm(steps, disable=not progress, desc="langevin"):
        noise_variance = 1 - float(schedule.alphas_cumprod[t])
        for _ in range(langevin_steps):
            score = denoiser.score(schedule, x, batch_t(t, x), extra_args)
            z = noise(x)
            if langevin_step_size is None:
                eps = snr_step_size(score, snr, float(schedule.alphas[t]))
            else:
                eps = langevin_step_size * noise_variance
            pred_x0 = _tweedie_x0(schedule, x, score, t)
            x = langevin_step(x, score, z, eps)
        record(intermediates, t, x, pred_x0)
    score = denoiser.score(schedule, x, batch_t(steps[-1], x), extra_args)
    return finish(_tweedie_x0(schedule, x, score, steps[-1]), intermediates)


def reverse_diffusion_step(x: torch.Tensor, score: torch.Tensor, beta: float, noise: torch.Tensor) -> torch.Tensor:
    """x' = (2 − √(1−β)) x + β s + √β z — the reverse-diffusion predictor of Song et al. 2021, PC sampling (VP)."""
    return (2 - (1 - beta) ** 0.5) * x + beta * score + beta**0.5 * noise


@torch.no_grad()
def pc_sample(
    denoiser: Denoiser | ModelFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: NoiseStream | None = None,
    extra_args: ExtraArgs = None,
    snr: float = 0.16,
    corrector_steps: int = 1,
    pc_predictor: str = "ancestral",
    stop_at: int | None = None,
    return_intermediates: bool = False,
    progress: bool = False,
):
    """Predictor–corrector sampling — Song et al. 2021, PC sampling (VP SDE): a reverse-SDE step, then Langevin.

    The predictor goes from timesteps[i] to the next level on the respaced chain β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i+1}}, as
    in ddpm_sample. `pc_predictor` "ancestral" is their ancestral sampling, x' = (x + β' s)/√(1−β') + √β' z: Ho et al.'s step with
    σ² = β', whose mean is the exact posterior mean, so it stays right on coarse grids. "reverse_diffusion" is
    reverse_diffusion_step, equal to it only to first order in β': it wants fine grids (~100+ levels).
    The corrector, `corrector_steps` Langevin steps with snr_step_size, runs at every level the predictor lands on
    except clean data (no score there) and `stop_at` (returned before its model call, as by the other samplers).
    The step to clean data is x̂_0 without noise (their "denoise"). Model calls: S + (S − 1)·corrector_steps.
    Returns x_0 (or x at level `stop_at`); with return_intermediates, (x, dict(t, x_t, pred_x0 lists)), x after
    each predictor step.
    """
    denoiser, noise = as_denoiser(denoiser), noise or batch_noise()
    steps = check_timesteps(timesteps, schedule, stop_at)
    if pc_predictor not in PREDICTORS:
        raise ValueError(f"unknown pc_predictor {pc_predictor!r}; choose one of {PREDICTORS}")
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    levels = steps[::-1] if stop_at is None else [stop_at] + steps[::-1]
    chain = schedule.respace(torch.tensor(levels))
    intermediates = new_intermediates() if return_intermediates else None
    last_index = 0 if stop_at is None else 1
    for i in tqdm(range(len(levels) - 1, last_index - 1, -1), disable=not progress, desc="pc"):
        t = levels[i]
        if i < len(levels) - 1:  # x at timesteps[0] is the prior sample: nothing to correct yet
            x = _correct(denoiser, x, t, schedule, noise, extra_args, snr, corrector_steps)
        out = denoiser.output(x, batch_t(t, x), extra_args)
        if pc_predictor == "ancestral" or i == 0:
            # σ² = β' on the chain: the variance half of a learned-variance model plays no part here
            x, pred_x0 = ancestral_step(chain, denoiser, out._replace(variance=None), x, i, noise, "beta")
        else:
            _, eps = denoiser.x0_eps(schedule, out.prediction, x, batch_t(t, x))
            score = score_from_eps(schedule, eps, x, batch_t(t, x))
            pred_x0 = _tweedie_x0(schedule, x, score, t)
            x = reverse_diffusion_step(x, score, float(chain.betas[i]), noise(x))
        record(intermediates, t, x, pred_x0)
    return finish(x, intermediates)


def _correct(denoiser: Denoiser, x: torch.Tensor, t: int, schedule: NoiseSchedule, noise: NoiseStream,
             extra_args: ExtraArgs, snr: float, steps: int) -> torch.Tensor:
    """The corrector: `steps` Langevin steps at level t with snr_step_size (α = 1 − β_t)."""
    for _ in range(steps):
        score = denoiser.score(schedule, x, batch_t(t, x), extra_args)
        x = langevin_step(x, score, noise(x), snr_step_size(score, snr, float(schedule.alphas[t])))
    return x
