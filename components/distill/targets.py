"""The math of the distillation methods, framework-free (no I/O, no trainer): what a student is
trained to match. Levels are integer timesteps of a discrete VP schedule (``NoiseSchedule``), with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t); a level of -1 means clean data (alpha 1, sigma 0).

Progressive distillation (Salimans & Ho 2022, alg. 2): the teacher takes two DDIM steps
t -> t' -> t''; the student's target x~ is the x-prediction for which ONE DDIM step t -> t'' lands
on the teacher's z_t'':

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

weighted by the truncated SNR, max(alpha_t^2 / sigma_t^2, 1) (their eq. 9 weighting for x-space).

Consistency models (Song et al. 2023) run in the variance-exploding variables of Karras et al.:
x = z / alpha, sigma_VE = sigma / alpha, and the teacher's probability-flow ODE is
dx/dsigma = (x - D(x, sigma)) / sigma with D the x0-prediction. The consistency function is
f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma), with c_skip(sigma_min) = 1 and
c_out(sigma_min) = 0, so f(x, sigma_min) = x exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from components.diffusion import NoiseSchedule

SIGMA_DATA = 0.5


def alpha_sigma(schedule: NoiseSchedule, levels: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) per example, broadcast like ``like`` (N, ...); level -1 is clean data."""
    abar = torch.where(levels >= 0, schedule.alphas_cumprod[levels.clamp(min=0).cpu()].to(like.device),
                       torch.ones((), dtype=schedule.alphas_cumprod.dtype, device=like.device))
    shape = (-1,) + (1,) * (like.ndim - 1)
    return abar.sqrt().to(like.dtype).view(shape), (1 - abar).clamp(min=0).sqrt().to(like.dtype).view(shape)


def ddim_step_x0(schedule: NoiseSchedule, z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                 t_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from level t to level t_next (< t, -1: clean) given x0."""
    a_t, s_t = alpha_sigma(schedule, t, z_t)
    a_n, s_n = alpha_sigma(schedule, t_next, z_t)
    eps = (z_t - a_t * x0) / s_t
    return a_n * x0 + s_n * eps


def progressive_target(schedule: NoiseSchedule, z_t: torch.Tensor, z_t2: torch.Tensor, t: torch.Tensor,
                       t2: torch.Tensor) -> torch.Tensor:
    """x~: the x-prediction whose single DDIM step t -> t2 reaches the teacher's two-step z_t2.
    At t2 = -1 (clean data) it is z_t2 itself."""
    a_t, s_t = alpha_sigma(schedule, t, z_t)
    a_2, s_2 = alpha_sigma(schedule, t2, z_t)
    ratio = s_2 / s_t
    return (z_t2 - ratio * z_t) / (a_2 - ratio * a_t)


def truncated_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """max(SNR_t, 1) per example, shaped like ``like`` for broadcasting."""
    a, s = alpha_sigma(schedule, t, like)
    return (a**2 / s**2).clamp(min=1.0)


def halve_steps(timesteps: torch.Tensor) -> torch.Tensor:
    """A progressive-distillation round: the student's levels are every other teacher level, so
    each student step spans two teacher steps (teacher levels t_0 > t_1 > ... ; student t_0 > t_2 > ...)."""
    if len(timesteps) % 2:
        raise ValueError(f"a round needs an even number of teacher steps, got {len(timesteps)}")
    return timesteps[::2]


# ---------------------------------------------------------------- consistency models


def ve_sigma(schedule: NoiseSchedule, levels: torch.Tensor) -> torch.Tensor:
    """sigma_VE = sigma / alpha of each level (float64, on the schedule's device)."""
    abar = schedule.alphas_cumprod[levels]
    return ((1 - abar) / abar).sqrt()


def consistency_scalings(sigma: torch.Tensor, sigma_min: float, sigma_data: float = SIGMA_DATA
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of Song et al. 2023, app. C: c_skip(sigma_min) = 1, c_out(sigma_min) = 0."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma_data**2 + sigma**2).sqrt()
    return c_skip, c_out


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per example (Song & Dhariwal 2023); c defaults to 0.00054 sqrt(d)."""
    d = a[0].numel()
    c = 0.00054 * d**0.5 if c is None else c
    return ((a - b).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example distance of the consistency loss: l2 (mean squared), l1 (mean absolute), pseudo_huber."""
    if kind == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if kind == "l1":
        return (a - b).abs().flatten(1).mean(1)
    if kind == "pseudo_huber":
        return pseudo_huber(a, b)
    raise ValueError(f"unknown consistency distance {kind!r}; valid: l2, l1, pseudo_huber")


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_VE, sigma_VE per example) -> x0


def ode_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             solver: str = "heun") -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma to
    sigma_next (per example, shaped (N,)): Euler, or Heun's second-order correction (Karras et al. 2022,
    alg. 1) unless sigma_next is 0."""
    view = (-1,) + (1,) * (x.ndim - 1)
    s, s_next = sigma.view(view), sigma_next.view(view)
    d = (x - denoiser(x, sigma)) / s
    x_euler = x + (s_next - s) * d
    if solver == "euler":
        return x_euler
    if solver != "heun":
        raise ValueError(f"unknown ODE solver {solver!r}; valid: heun, euler")
    d_next = (x_euler - denoiser(x_euler, sigma_next)) / s_next.clamp(min=1e-12)
    heun = x + (s_next - s) * 0.5 * (d + d_next)
    return torch.where(s_next > 0, heun, x_euler)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The N boundaries sigma_1 = sigma_min < ... < sigma_N = sigma_max of Karras et al. (eq. 5)."""
    i = torch.arange(n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + i / (n - 1) * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
