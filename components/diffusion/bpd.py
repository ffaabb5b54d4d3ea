"""The variational bound in bits per dimension — improved DDPM's ``calc_bpd_loop`` (Nichol & Dhariwal 2021,
sec. 2.3; Ho et al. 2020, eq. 5):

    L_vlb = L_T + Σ_{t=1}^{T−1} L_t + L_0,   L_T = KL(q(x_T|x_0) ‖ N(0, I))   (the prior term)
                                             L_t = KL(q(x_t|x_{t+1}, x_0) ‖ p_θ(x_t|x_{t+1}))
                                             L_0 = −log p_θ(x_0|x_1)           (the decoder NLL)

each in bits and averaged over the dimensions of x_0 (``losses.vlb_terms``: the same terms the loss trains,
indexed by the model's t as there, t = 0 the decoder). x_t is drawn from q(x_t|x_0) with the given noise, one
draw per term. ``timesteps`` subsamples the KL terms for speed: the decoder term (t = 0) is always computed,
and the mean of the chosen t > 0 terms times T − 1 stands in for their sum (an unbiased estimate when the
chosen t are spread evenly; exact when all are chosen).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from components.diffusion.losses import normal_kl, vlb_terms
from components.diffusion.process import p_mean_variance, q_sample
from components.diffusion.schedule import NoiseSchedule, extract

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T per example: KL(q(x_T|x_0) ‖ N(0, I)) in bits/dim; near 0 for a schedule that ends in noise."""
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.long, device=x0.device)
    alpha_bar = extract(schedule.alphas_cumprod, t, x0)
    mean, log_variance = alpha_bar.sqrt() * x0, torch.log(1.0 - alpha_bar).expand_as(x0)
    kl = normal_kl(mean, log_variance, torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.reshape(x0.shape[0], -1).mean(dim=1) / math.log(2.0)


def bpd_timesteps(num_timesteps: int, count: int | None) -> list[int]:
    """The t whose terms are computed: every t (count None or ≥ T), else 0 and ``count`` evenly spread t > 0."""
    if count is None or count >= num_timesteps - 1:
        return list(range(num_timesteps))
    if count < 1:
        raise ValueError(f"the number of timesteps must be at least 1, got {count}")
    spread = torch.linspace(1, num_timesteps - 1, count).round().long().unique().tolist()
    return [0] + spread


def vlb_bpd(model_fn: ModelFn, schedule: NoiseSchedule, x0: torch.Tensor, *, prediction: str = "eps",
            timesteps: int | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per example: ``total`` (bits/dim of L_vlb), ``prior``, ``decoder`` (L_0) and ``kl`` (Σ_{t≥1} L_t, or its
    estimate from ``timesteps`` of them). ``model_fn(x_t, t)`` returns the raw output of a learned-variance model
    (2C channels: ``prediction``, then the variance half); the noise comes from ``generator``."""
    steps = bpd_timesteps(schedule.num_timesteps, timesteps)
    n = x0.shape[0]
    decoder = torch.zeros(n, dtype=torch.float64)
    kl_terms = []
    for t_value in steps:
        t = torch.full((n,), t_value, dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = q_sample(schedule, x0, t, noise)
        out = p_mean_variance(schedule, model_fn(x_t, t), x_t, t, prediction=prediction, learned_variance=True)
        term = vlb_terms(schedule, out["mean"], out["log_variance"], x0, x_t, t).double().cpu()
        if t_value == 0:
            decoder = term
        else:
            kl_terms.append(term)
    kl = torch.stack(kl_terms, dim=1).mean(dim=1) * (schedule.num_timesteps - 1) if kl_terms else decoder * 0
    prior = prior_bpd(schedule, x0).double().cpu()
    return {"total": prior + kl + decoder, "prior": prior, "decoder": decoder, "kl": kl}
