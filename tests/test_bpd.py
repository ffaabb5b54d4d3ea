"""Bits per dimension of the variational bound (components/diffusion/bpd.py) against a hand-computed case: data
at one known point and a model that predicts the true posterior (mean and variance), so every KL term
t ≥ 1 is 0 and the bound is the prior term plus the decoder's, both in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from components.diffusion import NoiseSchedule, extract
from components.diffusion.bpd import bpd_timesteps, prior_bpd, vlb_bpd

pytestmark = pytest.mark.usefixtures("one_thread")

POINT = torch.tensor([[-0.5, 0.0], [0.25, 0.8]], dtype=torch.float64).view(1, 1, 2, 2)


def true_posterior_model(schedule: NoiseSchedule, variance_half: float = -1.0):
    """ε that maps every x_t back to POINT exactly, and v = −1: log Σ = log β̃_t, the posterior's (eq. 15)."""

    def model_fn(x, t):
        a = extract(schedule.alphas_cumprod, t, x)
        eps = (x - a.sqrt() * POINT) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(x, variance_half)], dim=1)

    return model_fn


def phi(x: float) -> float:  # the tanh approximation of the normal CDF, as the decoder term uses
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def by_hand(schedule: NoiseSchedule) -> tuple[float, float]:
    """(prior, decoder) bits/dim: KL(N(√ᾱ_T c, 1 − ᾱ_T) ‖ N(0, 1)) and −log₂ of c's bin under N(c, β̃_1)."""
    a_T = float(schedule.alphas_cumprod[-1])
    values = POINT.flatten().tolist()
    prior = sum(0.5 * (-1 - math.log(1 - a_T) + (1 - a_T) + a_T * c * c) for c in values) / len(values)
    sigma = math.exp(0.5 * float(schedule.posterior_log_variance_clipped[0]))
    decoder = sum(-math.log(phi(1 / 255 / sigma) - phi(-1 / 255 / sigma)) for _ in values) / len(values)
    return prior / math.log(2), decoder / math.log(2)


@pytest.mark.parametrize("timesteps", [None, 7])
def test_the_true_posterior_has_no_kl_terms_and_the_hand_computed_bound(timesteps):
    s = NoiseSchedule.from_name("linear", 40)
    x0 = POINT.repeat(3, 1, 1, 1)
    got = vlb_bpd(true_posterior_model(s), s, x0, timesteps=timesteps, generator=torch.Generator().manual_seed(0))
    prior, decoder = by_hand(s)
    torch.testing.assert_close(got["kl"], torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(got["prior"], torch.full((3,), prior, dtype=torch.float64))
    torch.testing.assert_close(got["decoder"], torch.full((3,), decoder, dtype=torch.float64))
    torch.testing.assert_close(got["total"], torch.full((3,), prior + decoder, dtype=torch.float64))
    torch.testing.assert_close(prior_bpd(s, x0), got["prior"])


def test_a_wrong_variance_costs_bits_and_the_timestep_subsets():
    s = NoiseSchedule.from_name("linear", 40)
    x0 = POINT.repeat(2, 1, 1, 1)
    exact = vlb_bpd(true_posterior_model(s), s, x0, generator=torch.Generator().manual_seed(0))
    wrong = vlb_bpd(true_posterior_model(s, variance_half=0.5), s, x0, generator=torch.Generator().manual_seed(0))
    assert (wrong["kl"] > 1e-3).all() and (wrong["total"] > exact["total"]).all()
    assert bpd_timesteps(40, None) == list(range(40)) and bpd_timesteps(40, 100) == list(range(40))
    assert bpd_timesteps(40, 3) == [0, 1, 20, 39]
    with pytest.raises(ValueError, match="at least 1"):
        bpd_timesteps(40, 0)
