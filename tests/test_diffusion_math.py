"""The diffusion math against closed forms and Monte Carlo: schedules (and diffusers' tables), the forward
process and posterior, the parameterisations, losses, guidance and thresholding. The samplers against a
Gaussian oracle and diffusers: test_diffusion_sampling.py; the sampler contract: test_samplers_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from components.diffusion import (
    NoiseSchedule,
    cfg_combine,
    discretized_gaussian_log_likelihood,
    dynamic_threshold,
    eps_from_v,
    extract,
    guidance_weight_from_scale,
    make_cfg_model_fn,
    normal_kl,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_eps,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
    spaced_timesteps,
    static_threshold,
    training_losses,
    v_from_x0_eps,
    vlb_terms,
    x0_from_v,
)
from diffusion_reference import DIFFUSERS_SCHEDULE, SCHEDULE_NAMES, batch_t, gen

# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_tables_are_consistent(name):
    s = NoiseSchedule.from_name(name, 1000)
    for table in (s.betas, s.alphas_cumprod, s.posterior_variance, s.posterior_mean_coef1, s.log_betas):
        assert table.shape == (1000,) and table.dtype == torch.float64
    assert bool((s.betas > 0).all()) and bool((s.betas <= 0.999).all())
    assert bool((s.betas[1:] >= s.betas[:-1]).all())  # all three schedules add noise ever faster
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    one = torch.ones(1000, dtype=torch.float64)
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, one)
    assert s.posterior_variance[0] == 0 and bool((s.posterior_variance <= s.betas).all())
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log())


def test_schedule_endpoints():
    linear = NoiseSchedule.from_name("linear", 1000).betas
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    scaled = NoiseSchedule.from_name("scaled_linear", 1000).betas
    assert scaled[0].item() == pytest.approx(0.00085) and scaled[-1].item() == pytest.approx(0.012)
    assert scaled.sqrt().diff().std() < 1e-12  # linear in √β
    cosine = NoiseSchedule.from_name("cosine", 1000)
    assert cosine.betas.max().item() == pytest.approx(0.999)  # the last β is clipped
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-12)
    with pytest.raises(ValueError):
        NoiseSchedule.from_name("sigmoid", 10)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedules_match_diffusers(name):
    ref = DDPMScheduler(num_train_timesteps=1000, **DIFFUSERS_SCHEDULE[name])
    ours = NoiseSchedule.from_name(name, 1000)
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spaced_timesteps_match_diffusers(spacing):
    for T, S in [(1000, 1), (1000, 7), (1000, 10), (1000, 48), (1000, 61), (1000, 1000), (50, 50), (20, 3)]:
        ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
        ref.set_timesteps(S)
        ours = spaced_timesteps(T, S, spacing)
        assert ours.dtype == torch.long and ours.shape == (S,)
        # diffusers' trailing spacing sometimes appends an extra step (even −1); the first S agree.
        assert ours.tolist() == ref.timesteps[:S].tolist(), (T, S)
    ref = DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(25)
    assert spaced_timesteps(1000, 25, "leading", steps_offset=1).tolist() == ref.timesteps.tolist()


def test_respace_uses_ratios_of_alphas_cumprod():
    s = NoiseSchedule.from_name("linear", 100)
    kept = torch.tensor([90, 60, 30, 0])
    r = s.respace(kept)
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[[0, 30, 60, 90]])
    torch.testing.assert_close(r.betas[2], 1 - s.alphas_cumprod[60] / s.alphas_cumprod[30])
    assert r.timestep_map.tolist() == [0, 30, 60, 90]
    full = s.respace(torch.arange(100))
    torch.testing.assert_close(full.betas, s.betas)


def test_extract_broadcasts_in_callers_dtype():
    s = NoiseSchedule.from_name("linear", 10)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    out = extract(s.betas, torch.tensor([0, 5, 9]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), s.betas[[0, 5, 9]].float())


# ---------------------------------------------------------------- forward process and posterior


def test_q_sample_marginal_moments():
    s = NoiseSchedule.from_name("linear", 1000)
    n = 8000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for t in (10, 300, 900):
        x_t = q_sample(s, x0, batch_t(t, n), torch.randn(n, 1, generator=gen(t), dtype=torch.float64))
        a = s.alphas_cumprod[t].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=4 * math.sqrt((1 - a) / n))
        assert x_t.var().item() == pytest.approx(1 - a, rel=4 * math.sqrt(2 / n))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_posterior_is_product_of_gaussians(name):
    # q(x_{t−1}|x_t,x0) ∝ N(x_t; √α_t x_{t−1}, β_t) · N(x_{t−1}; √ᾱ_{t−1} x0, 1−ᾱ_{t−1}):
    # as a function of x_{t−1} both are Gaussians, so precisions add.
    s = NoiseSchedule.from_name(name, 200)
    t = torch.arange(1, 200)
    x0 = torch.randn(199, 1, generator=gen(0), dtype=torch.float64)
    x_t = torch.randn(199, 1, generator=gen(1), dtype=torch.float64)
    a_t, b_t, ac_prev = s.alphas[t, None], s.betas[t, None], s.alphas_cumprod[t - 1, None]
    precision = a_t / b_t + 1 / (1 - ac_prev)
    expected_mean = (a_t.sqrt() * x_t / b_t + ac_prev.sqrt() * x0 / (1 - ac_prev)) / precision
    mean, variance, log_variance = q_posterior_mean_variance(s, x0, x_t, t)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(variance, 1 / precision, rtol=1e-9, atol=0)
    torch.testing.assert_close(log_variance, (1 / precision).log())


def test_posterior_matches_monte_carlo_regression():
    # Sample x0 ~ N(0.3, 0.5²), x_{t−1} ~ q(·|x0), x_t ~ q(·|x_{t−1}); regressing x_{t−1} on (x0, x_t)
    # recovers the posterior mean coefficients, and the residual variance is β̃_t.
    s = NoiseSchedule.from_name("cosine", 20)
    n, t = 20000, 7
    g = gen(3)
    x0 = 0.3 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    ac_prev = s.alphas_cumprod[t - 1]
    x_prev = ac_prev.sqrt() * x0 + (1 - ac_prev).sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    x_t = s.alphas[t].sqrt() * x_prev + s.betas[t].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    design = torch.stack([x0, x_t], dim=1)
    coef = torch.linalg.lstsq(design, x_prev[:, None]).solution.flatten()
    residual_var = (x_prev - design @ coef).var().item()
    assert coef[0].item() == pytest.approx(s.posterior_mean_coef1[t].item(), abs=0.02)
    assert coef[1].item() == pytest.approx(s.posterior_mean_coef2[t].item(), abs=0.02)
    assert residual_var == pytest.approx(s.posterior_variance[t].item(), rel=0.05)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_parameterisations_round_trip(name):
    s = NoiseSchedule.from_name(name, 1000)
    g = gen(4)
    x0 = torch.randn(16, 2, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 2, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (16,), generator=g)
    x_t = q_sample(s, x0, t, eps)
    v = v_from_x0_eps(s, x0, t, eps)
    tight = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(predict_x0_from_eps(s, x_t, t, eps), x0, **tight)
    torch.testing.assert_close(predict_eps_from_x0(s, x_t, t, x0), eps, **tight)
    torch.testing.assert_close(x0_from_v(s, x_t, t, v), x0, **tight)
    torch.testing.assert_close(eps_from_v(s, x_t, t, v), eps, **tight)
    for prediction, output in (("eps", eps), ("x0", x0), ("v", v)):
        got_x0, got_eps = predict_x0_eps(s, output, x_t, t, prediction)
        torch.testing.assert_close(got_x0, x0, **tight)
        torch.testing.assert_close(got_eps, eps, **tight)


def test_p_mean_variance_with_exact_x0_is_the_posterior():
    s = NoiseSchedule.from_name("linear", 100)
    g = gen(5)
    x0, eps = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    t = torch.arange(1, 100, 17)
    x_t = q_sample(s, x0, t, eps)
    mean, variance, _ = q_posterior_mean_variance(s, x0, x_t, t)
    out = p_mean_variance(s, eps, x_t, t, prediction="eps", variance="beta_tilde")
    torch.testing.assert_close(out["mean"], mean)
    torch.testing.assert_close(out["variance"], variance)
    fixed_large = p_mean_variance(s, eps, x_t, t, variance="beta")["variance"]
    torch.testing.assert_close(fixed_large, extract(s.betas, t, x_t).expand_as(x_t))
    # learned: v = −1 gives β̃_t, v = +1 gives β_t, v = 0 their geometric mean (improved DDPM eq. 15)
    for v, expected in ((-1.0, s.posterior_variance), (1.0, s.betas), (0.0, (s.posterior_variance * s.betas).sqrt())):
        out = p_mean_variance(s, torch.cat([eps, torch.full_like(eps, v)], 1), x_t, t, learned_variance=True)
        torch.testing.assert_close(out["variance"], extract(expected, t, x_t).expand_as(x_t))


# ---------------------------------------------------------------- losses


def test_normal_kl_closed_form():
    g = gen(22)
    m1, m2, lv1, lv2 = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    zero = normal_kl(m1, lv1, m1, lv1)
    assert zero.abs().max().item() < 1e-12
    kl = normal_kl(m1, lv1, m2, lv2)
    assert bool((kl >= 0).all())
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(kl, reference)


def test_discretized_gaussian_likelihood_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.0, -1.0), (0.73, -4.0), (-0.99, 0.5), (1.2, -2.5)):
        log_p = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_scale))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
        # the tanh CDF approximation is close to Φ: check the interior bins against the exact normal
        z = lambda v: (v - mean) / math.exp(log_scale)  # noqa: E731
        exact = torch.special.ndtr(z(levels + 1 / 255)) - torch.special.ndtr(z(levels - 1 / 255))
        assert (log_p.exp() - exact)[1:-1].abs().max().item() < 2e-3


def test_vlb_terms_vanish_for_the_true_posterior_and_are_positive_otherwise():
    s = NoiseSchedule.from_name("cosine", 100)
    g = gen(23)
    x0 = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64).clamp(-1, 1)
    t = torch.tensor([1, 10, 50, 99, 0])
    x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    mean, _, log_variance = q_posterior_mean_variance(s, x0, x_t, t)
    exact = vlb_terms(s, mean, log_variance, x0, x_t, t)
    assert exact[:4].abs().max().item() < 1e-10
    assert exact[4].item() > 0  # t = 0: a negative log-likelihood in bits/dim
    off = vlb_terms(s, mean + 0.1, log_variance + 0.3, x0, x_t, t)
    assert bool((off[:4] > 1e-4).all())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_losses_targets_and_stop_gradient(prediction):
    s = NoiseSchedule.from_name("linear", 1000)
    g = gen(24)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 500, 999])
    target = {"eps": noise, "x0": x0, "v": v_from_x0_eps(s, x0, t, noise)}[prediction]

    perfect = training_losses(s, lambda x_t, t: target, x0, t, noise=noise, prediction=prediction)
    assert perfect["mse"].abs().max().item() < 1e-20 and bool((perfect["vlb"] == 0).all())

    output = torch.cat([target + 0.1, torch.zeros_like(target)], dim=1).requires_grad_(True)
    losses = training_losses(s, lambda x_t, t, y: output, x0, t, noise=noise, prediction=prediction,
                             learned_variance=True, model_kwargs={"y": None})
    assert losses["loss"].shape == (4,) and bool((losses["vlb"][1:] >= 0).all())
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.001 * 1000 * losses["vlb"])
    (grad_vlb,) = torch.autograd.grad(losses["vlb"].sum(), output, retain_graph=True)
    assert grad_vlb[:, :3].abs().max().item() == 0.0  # stop-gradient: the VLB never moves the mean
    assert grad_vlb[:, 3:].abs().max().item() > 0.0  # … but trains the variance
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert grad_mse[:, :3].abs().min().item() > 0.0 and grad_mse[:, 3:].abs().max().item() == 0.0


# ---------------------------------------------------------------- guidance and thresholding


def test_cfg_combine_conventions():
    g = gen(25)
    cond, uncond = torch.randn(2, 3, 4, generator=g)
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 3.0), 4 * cond - 3 * uncond)
    for scale in (1.0, 4.0, 7.5):
        torch.testing.assert_close(
            cfg_combine(cond, uncond, guidance_weight_from_scale(scale)), scale * cond + (1 - scale) * uncond
        )


def test_cfg_model_fn_batches_once_and_guides_only_the_mean_channels():
    calls = []

    def model_fn(x, t, y):
        calls.append(x.shape[0])
        return torch.cat([x * (1 + y[:, None, None].float()), x + t[:, None, None] + y[:, None, None]], dim=1)

    x = torch.randn(3, 2, 5, generator=gen(26))
    t, y = torch.tensor([4, 5, 6]), torch.tensor([1, 2, 3])
    guided = make_cfg_model_fn(model_fn, null_label=0, guidance_weight=2.0)(x, t, y)
    assert calls == [6]
    cond, uncond = model_fn(x, t, y), model_fn(x, t, torch.zeros_like(y))
    torch.testing.assert_close(guided[:, :2], 3 * cond[:, :2] - 2 * uncond[:, :2])
    torch.testing.assert_close(guided[:, 2:], cond[:, 2:])
    torch.testing.assert_close(make_cfg_model_fn(model_fn, 0, 0.0)(x, t, y), cond)


def test_cfg_model_fn_doubles_every_other_condition_and_refuses_one_without_a_row_per_example():
    seen = {}

    def model_fn(x, t, y, image=None, flag=None):
        seen.update(image=image, flag=flag)
        return x * (1 + y[:, None, None].float()) + image

    x, t, y = torch.randn(3, 2, 5, generator=gen(28)), torch.tensor([4, 5, 6]), torch.tensor([1, 2, 3])
    image = torch.randn(3, 2, 5, generator=gen(29))
    guided = make_cfg_model_fn(model_fn, null_label=0, guidance_weight=2.0)(x, t, y, image=image, flag="on")
    assert torch.equal(seen["image"], torch.cat([image, image])) and seen["flag"] == "on"
    cond, uncond = model_fn(x, t, y, image), model_fn(x, t, torch.zeros_like(y), image)
    torch.testing.assert_close(guided, 3 * cond - 2 * uncond)
    with pytest.raises(ValueError, match="conditioning 'image' needs 3 rows"):
        make_cfg_model_fn(model_fn, 0, 2.0)(x, t, y, image=image[:1])


def test_thresholds():
    g = gen(27)
    inside = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    torch.testing.assert_close(dynamic_threshold(inside), inside)
    torch.testing.assert_close(static_threshold(inside), inside)
    wild = 5 * torch.randn(4, 3, 8, 8, generator=g)
    out = dynamic_threshold(wild, percentile=0.9)
    assert out.abs().max().item() <= 1.0
    s = torch.quantile(wild.reshape(4, -1).abs(), 0.9, dim=1)
    torch.testing.assert_close(out[0], wild[0].clamp(-s[0], s[0]) / s[0])
    assert static_threshold(wild).abs().max().item() == 1.0
