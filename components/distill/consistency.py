"""A consistency model made of a v-prediction DiT, its discretisation, and consistency sampling.

Why v: in the variance-exploding variables x = z / alpha, sigma = sigma_VP / alpha, a v-prediction
network is exactly EDM's preconditioning (Karras et al. 2022) at sigma_data = 1, with F = -v:

    x0_hat = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v(alpha x, t)

Scaled latents have unit variance, so sigma_data = 1 is also the right data scale. The
consistency function takes the same F with Song et al.'s boundary-respecting scalings,

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F,   c_skip(sigma_min) = 1, c_out(sigma_min) = 0,

so a student copied from the DiT starts close to the DiT's own denoiser, and f(x, sigma_min) = x.
The levels are integer timesteps of the DiT's schedule, so the network only ever sees the
timesteps it was trained on.
"""

from __future__ import annotations

import torch

from components.diffusion import NoiseSchedule
from components.distill.targets import consistency_scalings, karras_sigmas, ve_sigma

SIGMA_DATA = 1.0  # scaled latents: unit variance


def consistency_levels(schedule: NoiseSchedule, n: int, rho: float = 7.0) -> torch.Tensor:
    """Ascending timesteps, ``n`` of them at most: the schedule's levels nearest to Karras et al.'s
    sigmas between its smallest and largest noise (duplicates, where the levels are coarser than
    the sigmas, are dropped; the ends are always level 0 and T - 1)."""
    table = ve_sigma(schedule, torch.arange(schedule.num_timesteps))
    wanted = karras_sigmas(n, float(table[0]), float(table[-1]), rho)
    nearest = (table.log()[None, :] - wanted.log()[:, None]).abs().argmin(1)
    return torch.unique(nearest)  # sorted ascending


def level_sigmas(schedule: NoiseSchedule, levels: torch.Tensor) -> torch.Tensor:
    """VE sigma of each level, float64."""
    return ve_sigma(schedule, levels.cpu())


class ConsistencyFunction:
    """f_theta(x, level index) of a v-prediction DiT over the ascending ``levels`` of ``schedule``."""

    def __init__(self, schedule: NoiseSchedule, levels: torch.Tensor):
        self.schedule, self.levels = schedule, levels.cpu().long()
        self.sigmas = level_sigmas(schedule, self.levels)  # ascending
        self.sigma_min = float(self.sigmas[0])

    def __call__(self, model, x: torch.Tensor, index: torch.Tensor, y: torch.Tensor | None,
                 force_drop_ids: torch.Tensor | None = None, **text) -> torch.Tensor:
        """x: VE variables (N, c, h, w), fp32; index: (N,) positions in ``levels``; ``y`` the labels (None
        for a text model); ``text`` the model's text arguments (``captions``, or their encoding:
        ``context``, ``context_mask``, ``pooled``). Returns fp32."""
        sigma = self.sigmas[index.cpu()].to(x.device, torch.float32)
        view = (-1,) + (1,) * (x.ndim - 1)
        alpha = (1 + sigma**2).rsqrt().view(view)
        dtype = next(model.parameters()).dtype if hasattr(model, "parameters") else x.dtype
        t = self.levels[index.cpu()].to(x.device)
        if force_drop_ids is None and y is not None:  # never the DiT's own random label dropout (on in train mode)
            force_drop_ids = torch.zeros_like(y)
        v = model((alpha * x).to(dtype), t, y, force_drop_ids=force_drop_ids, **text).float()[:, :x.shape[1]]
        c_skip, c_out = consistency_scalings(sigma, self.sigma_min, SIGMA_DATA)
        return c_skip.view(view) * x - c_out.view(view) * v

    def nearest_index(self, timestep: int) -> int:
        """The position of the level nearest to ``timestep``."""
        return int((self.levels - int(timestep)).abs().argmin())

    def x0_model(self, model):
        """The student as an x̂_0-predicting network of the VP variables, ``(x_t, t, y) -> x̂_0``, for the
        sampler registry's ``consistency`` sampler: ``Denoiser(fn.x0_model(student), prediction="x0")``.
        Each timestep is taken at its nearest level."""
        def predict(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **text) -> torch.Tensor:
            index = (self.levels[None, :] - t.cpu()[:, None]).abs().argmin(1)
            sigma = self.sigmas[index].to(x_t.device, torch.float32).view((-1,) + (1,) * (x_t.ndim - 1))
            return self(model, x_t.float() * (1 + sigma**2).sqrt(), index, y, **text)  # x_VE = x_t / sqrt(abar)
        return predict

    def teacher_denoiser(self, guided_v, y: torch.Tensor | None, **text):
        """D(x, sigma) -> x0_hat of a (guided) v-model ``guided_v(z, t, y, **text)``, for ``ode_step``;
        every sigma must be one of the levels' sigmas."""
        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            table = self.sigmas.to(sigma.device, sigma.dtype)
            index = (sigma[:, None] - table[None, :]).abs().argmin(1)
            view = (-1,) + (1,) * (x.ndim - 1)
            s = self.sigmas[index.cpu()].to(x.device, torch.float32).view(view)
            t = self.levels[index.cpu()].to(x.device)
            v = guided_v(x / (1 + s**2).sqrt(), t, y, **text).float()[:, :x.shape[1]]
            return x / (1 + s**2) - s / (1 + s**2).sqrt() * v
        return denoise


def ct_num_levels(step: int, total_steps: int, initial: int, final: int) -> int:
    """N(k) of consistency training (Song et al. 2023, app. C): from ``initial`` to ``final``."""
    frac = step / max(total_steps, 1)
    return int(min(final, ((frac * ((final + 1) ** 2 - initial**2) + initial**2) ** 0.5 - 1) // 1 + 1))


def ct_target_decay(num_levels: int, initial_levels: int, initial_ema: float) -> float:
    """mu(k) = exp(s0 log(mu0) / N(k))."""
    import math

    return math.exp(initial_levels * math.log(initial_ema) / num_levels)
