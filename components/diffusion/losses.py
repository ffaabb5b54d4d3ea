"""Training objectives: L_simple (Ho et al. 2020), L_hybrid = L_simple + λ·L_vlb and L_vlb (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from components.diffusion.process import p_mean_variance, q_posterior_mean_variance, q_sample, v_from_x0_eps
from components.diffusion.schedule import NoiseSchedule


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats — closed form for Gaussians (Ho et al. 2020, eq. 5)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715x³))) — the tanh approximation used by Ho et al. 2020 for L_0."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [−1, 1] on 256 levels under N(means, e^{2·log_scales}) binned — Ho et al. 2020, eq. 13 (L_0)."""
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - means + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - means - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # lowest bin extends to −∞
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # highest bin extends to +∞
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


def _mean_over_data_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def vlb_terms(
    schedule: NoiseSchedule,
    model_mean: torch.Tensor,
    model_log_variance: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Per-example L_t in bits/dim: KL(q(x_{t−1}|x_t,x_0) ‖ p_θ) for t > 0, −log p_θ(x_0|x_1) for t = 0 — Ho et al. 2020, eq. 5."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = _mean_over_data_dims(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    decoder_nll = -_mean_over_data_dims(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    ) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, decoder_nll, kl)


def training_losses(
    schedule: NoiseSchedule,
    model_fn: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    prediction: str = "eps",
    learned_variance: bool = False,
    vlb_weight: float = 0.001,
    model_kwargs: dict[str, Any] | None = None,
    objective: str | None = None,
    importance: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example dict(loss, mse, vlb) of ``objective`` (None: "hybrid" when learned_variance, else "simple"):

    - "simple": L_simple = ‖target − model‖² (Ho et al. 2020, eq. 14);
    - "hybrid": L_simple + λ·T·L_t with a stop-gradient mean, the VLB training only Σ (Nichol & Dhariwal 2021,
      sec. 3.1; λ = vlb_weight, 0.001 in the paper);
    - "vlb": T·L_t, mean and Σ both through the bound.

    `vlb` is L_t in bits/dim for the sampled t; with t uniform, T·L_t estimates L_vlb = Σ_t L_t. With t drawn
    by importance (timestep_sampler.py), ``importance`` = 1/(T p_t) weights the VLB term so the estimate stays
    unbiased (sec. 3.3). `vlb` is zero (and not computed) for "simple".
    """
    objective = objective or ("hybrid" if learned_variance else "simple")
    if objective not in ("simple", "hybrid", "vlb"):
        raise ValueError(f"unknown objective {objective!r}; choose 'simple', 'hybrid' or 'vlb'")
    if objective != "simple" and not learned_variance:
        raise ValueError(f"objective {objective!r} trains the variance: it needs learned_variance")
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(schedule, x0, t, noise)
    model_output = model_fn(x_t, t, **(model_kwargs or {}))
    channels = x0.shape[1]
    mean_output = model_output[:, :channels]
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    elif prediction == "v":
        target = v_from_x0_eps(schedule, x0, t, noise)
    else:
        raise ValueError(f"unknown prediction {prediction!r}; choose 'eps', 'x0' or 'v'")
    mse = _mean_over_data_dims((mean_output - target) ** 2)
    if objective == "simple":
        vlb = torch.zeros_like(mse)
        return {"loss": mse + vlb_weight * schedule.num_timesteps * vlb, "mse": mse, "vlb": vlb}
    # hybrid: the VLB trains only Σ_θ, the mean is learned by L_simple alone (improved DDPM sec. 3.1)
    through = model_output if objective == "vlb" else torch.cat([mean_output.detach(), model_output[:, channels:]], 1)
    out = p_mean_variance(schedule, through, x_t, t, prediction=prediction, learned_variance=True)
    vlb = vlb_terms(schedule, out["mean"], out["log_variance"], x0, x_t, t)
    weighted = vlb if importance is None else vlb * importance
    if objective == "vlb":
        return {"loss": schedule.num_timesteps * weighted, "mse": mse, "vlb": vlb}
    return {"loss": mse + vlb_weight * schedule.num_timesteps * weighted, "mse": mse, "vlb": vlb}
