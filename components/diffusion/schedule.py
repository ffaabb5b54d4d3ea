"""Noise schedules: the β_t table of a discrete Gaussian diffusion and every table derived from it.

All tables are float64 on the CPU; `extract` gathers them per example and casts to the caller's dtype,
so float32/bfloat16 training never accumulates schedule error in low precision.
"""

from __future__ import annotations

import math

import torch


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_t evenly spaced from beta_start to beta_end — Ho et al. 2020, sec. 4."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """β_t = linspace(√β_start, √β_end)² — Rombach et al. 2022 (LDM / Stable Diffusion)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = min(1 − ᾱ_t/ᾱ_{t−1}, max_beta), ᾱ_t = f(t)/f(0), f = cos²((t/T+s)/(1+s)·π/2) — Nichol & Dhariwal 2021, eq. 17."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


BETA_SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}


class NoiseSchedule:
    """Per-timestep tables of q(x_t|x_0) and q(x_{t−1}|x_t,x_0) — Ho et al. 2020, eqs. 4, 6, 7.

    Index i of every table is timestep `timestep_map[i]` of the schedule the model was trained on
    (the identity unless this schedule came from `respace`).
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a non-empty 1-D table with 0 < β_t ≤ 1")
        self.num_timesteps = betas.numel()
        self.timestep_map = (
            torch.arange(self.num_timesteps) if timestep_map is None else torch.as_tensor(timestep_map).long().cpu()
        )
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t  (Ho et al. eq. 7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0 has no logarithm; improved DDPM uses β̃_1 there (it only enters the t=0 decoder term).
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_name(cls, name: str, T: int) -> "NoiseSchedule":
        """Build a schedule from a config name: "linear", "scaled_linear" or "cosine"."""
        if name not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
        return cls(BETA_SCHEDULES[name](T))

    def respace(self, timesteps: torch.Tensor) -> "NoiseSchedule":
        """Schedule over a timestep subset: β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}, ᾱ_{t_{−1}} = 1 — Nichol & Dhariwal 2021, sec. 4."""
        kept = torch.unique(torch.as_tensor(timesteps).long().cpu())  # sorted ascending
        if kept.numel() == 0 or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return NoiseSchedule(1.0 - alphas_cumprod / previous, timestep_map=self.timestep_map[kept])

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.num_timesteps}, β=[{self.betas[0]:.3g} … {self.betas[-1]:.3g}])"


def extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (B, 1, …, 1) to broadcast against x, in x's dtype and on x's device."""
    values = table[t.to(table.device).long()]
    return values.to(device=x.device, dtype=x.dtype).reshape(t.shape[0], *([1] * (x.dim() - 1)))


def spaced_timesteps(T: int, S: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """S of T training timesteps, descending — spacings of Lin et al. 2023, table 2 (as diffusers computes them)."""
    if not 1 <= S <= T:
        raise ValueError(f"need 1 ≤ S ≤ T, got S={S}, T={T}")
    if spacing == "leading":
        ratio = T // S
        steps = [k * ratio + steps_offset for k in range(S)]
    elif spacing == "trailing":
        # numpy's arange(T, 0, -T/S) fills start + k·delta with delta = (T − T/S) − T; repeat that exactly.
        delta = (T - T / S) - T
        steps = [round(T + k * delta) - 1 for k in range(S)][::-1]
    elif spacing == "linspace":
        step = (T - 1) / (S - 1) if S > 1 else 0.0
        steps = [round(k * step) for k in range(S)]
        steps[-1] = T - 1 if S > 1 else 0
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose 'leading', 'trailing' or 'linspace'")
    return torch.tensor(steps[::-1], dtype=torch.long)
