"""Shared by the diffusion-math tests: diffusers' names for our schedules and prediction types, seeded
generators, and a random linear model whose output depends on x and t."""

from __future__ import annotations

import torch

from components.diffusion import NoiseSchedule

SCHEDULE_NAMES = ["linear", "scaled_linear", "cosine"]
DIFFUSERS_SCHEDULE = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_t(t: int, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.long)


def random_linear_model(channels: int, T: int, learned_variance: bool = False, dtype=torch.float64):
    g = gen(10)
    out_channels = 2 * channels if learned_variance else channels
    weight = torch.randn(out_channels, channels, generator=g, dtype=dtype) / channels**0.5
    bias = 0.1 * torch.randn(out_channels, 1, 1, generator=g, dtype=dtype)

    def model_fn(x, t):
        scale = 0.5 * (1 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / T)
        out = torch.einsum("oc,bchw->bohw", weight, x) * scale + bias
        if learned_variance:
            out = torch.cat([out[:, :channels], torch.tanh(out[:, channels:])], dim=1)
        return out

    return model_fn


def in_float64(scheduler, schedule: NoiseSchedule, set_alpha_to_one: bool = True):
    """Give a diffusers scheduler our float64 tables, so the comparison tests step formulas, not float32 cumprods."""
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = schedule.alphas.clone()
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = scheduler.one if set_alpha_to_one else schedule.alphas_cumprod[0].clone()
    return scheduler
