"""Classifier guidance — Dhariwal & Nichol 2021, sec. 4, alg. 2.

A noise-conditional classifier f_φ(y | x_t, t) steers any ε-, x0- or v-model toward class y:

    ε̄(x_t, t) = ε_θ(x_t, t) − w · √(1 − ᾱ_t) · ∇_{x_t} log f_φ(y | x_t, t).

Since ∇ log p(x_t) = −ε / √(1 − ᾱ_t), ε̄ is the ε of the score ∇ log p(x_t) + w ∇ log f(y | x_t),
i.e. of p(x_t) f(y | x_t)^w; so the guided output drops into every sampler here (DDIM as in alg. 2,
ancestral DDPM through the same mean, the score-based samplers through the same score). It wraps
any fn(x_t, t, y), a classifier-free-guided one included (then both guidances act).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from components.diffusion.process import _signal_and_noise_scales, predict_x0_eps, predict_x0_from_eps, v_from_x0_eps
from components.diffusion.schedule import NoiseSchedule

ClassifierFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> logits (N, K)


def classifier_log_prob_grad(classifier_fn: ClassifierFn, x_t: torch.Tensor, t: torch.Tensor,
                             y: torch.Tensor) -> torch.Tensor:
    """∇_{x_t} log f(y | x_t, t) per example (the sum over the batch separates, since each example's
    log-probability depends on its own x_t only), in x_t's dtype."""
    # Samplers run under inference mode, whose tensors cannot enter autograd: leave it for this
    # gradient (clones of inference tensors made outside it are ordinary tensors).
    with torch.inference_mode(False), torch.enable_grad():
        # at least fp32: the gradient of a bf16 classifier's log-softmax is too coarse to steer with
        x = x_t.detach().clone().to(torch.promote_types(x_t.dtype, torch.float32)).requires_grad_(True)
        log_probs = F.log_softmax(classifier_fn(x, t.clone()).to(x.dtype), dim=-1)
        chosen = log_probs.gather(1, y.clone().long().view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(chosen, x)
    return grad.to(x_t.dtype)


def make_classifier_guided_model_fn(
    model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    classifier_fn: ClassifierFn,
    schedule: NoiseSchedule,
    weight: float,
    prediction: str = "eps",
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Guided fn(x_t, t, y, **cond) returning the model's own parameterisation (ε, x0 or v), with ε replaced
    by ε̄. With learned variance (2C output channels) only the first C change. ``t`` are training
    timesteps, as every sampler here passes them: ``schedule`` is the training schedule."""

    def guided(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **cond) -> torch.Tensor:
        out = model_fn(x_t, t, y, **cond)  # the classifier sees x_t and t only; cond is the model's
        if weight == 0:
            return out
        channels = x_t.shape[1]
        _, eps = predict_x0_eps(schedule, out[:, :channels], x_t, t, prediction)
        _, sigma = _signal_and_noise_scales(schedule, t, x_t)
        eps = eps - weight * sigma * classifier_log_prob_grad(classifier_fn, x_t, t, y)
        if prediction == "eps":
            guided_part = eps
        else:
            x0 = predict_x0_from_eps(schedule, x_t, t, eps)
            guided_part = x0 if prediction == "x0" else v_from_x0_eps(schedule, x0, t, eps)
        return torch.cat([guided_part.to(out.dtype), out[:, channels:]], dim=1)

    return guided
