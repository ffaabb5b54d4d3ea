"""`sample.fixed_variance` (Ho et al. 2020, sec. 3.2): the DDPM sampler's σ_t² = β_t or β̃_t for a DiT that
does not learn Σ, from the config through the registry's config_options to ddpm_sample, checked against one
ancestral step computed by hand, and refused where it cannot apply."""

from __future__ import annotations

import math

import pytest
import torch

from components.diffusion import NoiseSchedule, batch_noise, config_options, run_sampler

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_eps_model(x, t):
    return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)  # any deterministic ε-model will do


def one_step_by_hand(x: torch.Tensor, z: torch.Tensor, s: NoiseSchedule, t: int, t_prev: int, fixed: str):
    """x_{t_prev} = μ̃(x̂_0, x_t) + σ z on the respaced pair (t_prev, t): β' = 1 − ᾱ_t/ᾱ_{t_prev},
    β̃' = (1 − ᾱ_{t_prev})/(1 − ᾱ_t) β' (Ho et al. eq. 7; Nichol & Dhariwal sec. 4)."""
    a_t, a_prev = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t_prev])
    beta = 1 - a_t / a_prev
    beta_tilde = (1 - a_prev) / (1 - a_t) * beta
    eps = linear_eps_model(x, torch.full((len(x),), t))
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    return mean + math.sqrt(beta if fixed == "beta" else beta_tilde) * z


@pytest.mark.parametrize("fixed", ["beta", "beta_tilde"])
def test_each_choice_is_the_hand_computed_step(fixed):
    from components.dit.config import SamplingConfig

    s = NoiseSchedule.from_name("linear", 100)
    config = SamplingConfig(sampler="ddpm", fixed_variance=fixed)
    options = config_options("ddpm", config)
    assert options == {"fixed_variance": fixed}  # the config's field reaches the sampler by name
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    got = run_sampler("ddpm", linear_eps_model, x, torch.tensor([60]), s,
                      noise=batch_noise(torch.Generator().manual_seed(1)), stop_at=25, **options)
    torch.testing.assert_close(got, one_step_by_hand(x, z, s, 60, 25, fixed), rtol=1e-5, atol=1e-6)


def test_the_two_choices_give_different_samples_and_the_default_is_beta_tilde():
    from components.dit.config import SamplingConfig
    from components.dit.generate import generate
    from test_score_samplers import tiny_autoencoder, untrained_dit

    dit, meta = untrained_dit(learn_sigma=False)
    ae, ae_meta = tiny_autoencoder()
    draw = {fixed: generate(dit, meta, ae, ae_meta, [0, 1, 2], SamplingConfig(sampler="ddpm", steps=5, guidance=1.0,
                                                                               fixed_variance=fixed))
            for fixed in ("beta", "beta_tilde")}
    assert not torch.equal(draw["beta"], draw["beta_tilde"])
    default = generate(dit, meta, ae, ae_meta, [0, 1, 2], SamplingConfig(sampler="ddpm", steps=5, guidance=1.0))
    assert torch.equal(default, draw["beta_tilde"])


def test_refused_where_it_cannot_apply():
    from components.dit.config import DitConfig, SamplingConfig
    from components.dit.generate import generate
    from test_score_samplers import tiny_autoencoder, untrained_dit

    with pytest.raises(ValueError, match="fixed_variance.*sampler"):
        SamplingConfig(sampler="ddim", fixed_variance="beta")
    with pytest.raises(ValueError, match="fixed_variance.*learn_sigma"):
        DitConfig(learn_sigma=True, sample={"sampler": "ddpm", "fixed_variance": "beta"})
    dit, meta = untrained_dit(learn_sigma=True)
    ae, ae_meta = tiny_autoencoder()
    with pytest.raises(ValueError, match="learn_sigma"):
        generate(dit, meta, ae, ae_meta, [0], SamplingConfig(sampler="ddpm", steps=2, fixed_variance="beta"))
    # the default keeps the JSON (and so the DiT and evaluate cache keys) of before the field
    assert "fixed_variance" not in SamplingConfig(sampler="ddpm").model_dump(mode="json")
    assert SamplingConfig(sampler="ddpm", fixed_variance="beta").model_dump(mode="json")["fixed_variance"] == "beta"
