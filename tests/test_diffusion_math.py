"""The diffusion math against closed forms, Monte Carlo, a Gaussian oracle and the diffusers schedulers."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from components.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    cfg_combine,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
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


# ---------------------------------------------------------------- a Gaussian oracle: data ~ N(μ, σ²)

MU, SIGMA = 0.5, 0.6


def gaussian_oracle(schedule: NoiseSchedule):
    """The exact E[ε | x_t] for data N(μ, σ²): x_t ~ N(√ᾱ μ, ᾱσ² + 1−ᾱ), Cov(ε, x_t) = √(1−ᾱ)."""

    def model_fn(x, t):
        a = extract(schedule.alphas_cumprod, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)

    return model_fn


def test_ddim_invert_then_sample_round_trips():
    s = NoiseSchedule.from_name("linear", 1000)
    oracle = gaussian_oracle(s)
    x0 = MU + SIGMA * torch.randn(256, 1, generator=gen(6), dtype=torch.float64)
    ts = spaced_timesteps(1000, 50, "leading")
    naive = ddim_sample(oracle, ddim_invert(oracle, x0, ts, s), ts, s)
    x_T = ddim_invert(oracle, x0, ts, s, fixed_point_iters=3)
    assert x_T.std().item() == pytest.approx(1.0, abs=0.1)  # the encoding is a Gaussian latent
    back = ddim_sample(oracle, x_T, ts, s)
    assert (back - x0).abs().max().item() < 1e-3
    assert (back - x0).abs().max() < (naive - x0).abs().max() / 10


def test_ddim_oracle_follows_the_probability_flow_and_hits_the_data_moments():
    s = NoiseSchedule.from_name("linear", 1000)
    x_T = torch.randn(2000, 1, generator=gen(7), dtype=torch.float64)
    x0 = ddim_sample(gaussian_oracle(s), x_T, spaced_timesteps(1000, 250, "trailing"), s)
    # η = 0 with the exact ε is the ODE whose flow maps N(√ᾱ_T μ, s_T²) affinely onto N(μ, σ²).
    a = s.alphas_cumprod[-1]
    exact = MU + SIGMA / (a * SIGMA**2 + 1 - a).sqrt() * (x_T - a.sqrt() * MU)
    assert (x0 - exact).abs().max().item() < 0.03
    assert x0.mean().item() == pytest.approx(MU, abs=0.05)
    assert x0.std().item() == pytest.approx(SIGMA, rel=0.06)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_oracle_hits_the_data_moments(variance):
    s = NoiseSchedule.from_name("cosine", 1000)
    x_T = torch.randn(2000, 1, generator=gen(8), dtype=torch.float64)
    ts = spaced_timesteps(1000, 250, "trailing")
    x0 = ddpm_sample(gaussian_oracle(s), x_T, ts, s, generator=gen(9), variance=variance)
    assert x0.mean().item() == pytest.approx(MU, abs=0.05)
    assert x0.std().item() == pytest.approx(SIGMA, rel=0.08)


# ---------------------------------------------------------------- diffusers as the reference implementation


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


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_ddim_sampling_matches_diffusers_float64(name, prediction):
    s = NoiseSchedule.from_name(name, 1000)
    model = random_linear_model(3, 1000)
    for set_alpha_to_one, eta, spacing, clip in [
        (True, 0.0, "leading", None),
        (False, 1.0, "leading", None),
        (True, 0.5, "trailing", None),
        (False, 0.0, "leading", "static"),
    ]:
        ref = DDIMScheduler(
            num_train_timesteps=1000, prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=clip == "static",
            set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing, **DIFFUSERS_SCHEDULE[name],
        )
        in_float64(ref, s, set_alpha_to_one)
        ref.set_timesteps(10)
        x = torch.randn(2, 3, 4, 4, generator=gen(11), dtype=torch.float64)
        expected, g_ref = [], gen(12)
        x_ref = x
        for t in ref.timesteps:
            out = ref.step(model(x_ref, t), t, x_ref, eta=eta, use_clipped_model_output=True, generator=g_ref)
            x_ref = out.prev_sample
            expected.append((out.prev_sample, out.pred_original_sample))
        final = ref.final_alpha_cumprod.item()
        got, inter = ddim_sample(
            model, x, ref.timesteps, s, generator=gen(12), prediction=prediction, eta=eta, final_alpha_cumprod=final,
            clip_x0=static_threshold if clip else None, return_intermediates=True,
        )
        for (ref_x, ref_x0), our_x, our_x0 in zip(expected, inter["x_t"], inter["pred_x0"]):
            torch.testing.assert_close(our_x, ref_x, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(our_x0, ref_x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got, x_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_ddpm_strided_sampling_matches_diffusers_float64(name, prediction, variance_type):
    s = NoiseSchedule.from_name(name, 1000)
    learned = variance_type == "learned_range"
    model = random_linear_model(3, 1000, learned_variance=learned)
    ref = DDPMScheduler(
        num_train_timesteps=1000, prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=False,
        variance_type=variance_type, timestep_spacing="leading", **DIFFUSERS_SCHEDULE[name],
    )
    in_float64(ref, s)
    ref.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4, generator=gen(13), dtype=torch.float64)
    x_ref, g_ref, expected = x, gen(14), []
    for t in ref.timesteps:
        out = ref.step(model(x_ref, t), t, x_ref, generator=g_ref)
        x_ref = out.prev_sample
        expected.append((out.prev_sample, out.pred_original_sample))
    got, inter = ddpm_sample(
        model, x, ref.timesteps, s, generator=gen(14), prediction=prediction, learned_variance=learned,
        variance="beta" if variance_type == "fixed_large" else "beta_tilde", return_intermediates=True,
    )
    for (ref_x, ref_x0), our_x, our_x0 in zip(expected, inter["x_t"], inter["pred_x0"]):
        torch.testing.assert_close(our_x, ref_x, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(our_x0, ref_x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, x_ref, rtol=1e-9, atol=1e-9)


def test_ddpm_full_chain_matches_diffusers_float64():
    s = NoiseSchedule.from_name("linear", 50)
    model = random_linear_model(2, 50)
    ref = in_float64(DDPMScheduler(num_train_timesteps=50, clip_sample=False, variance_type="fixed_large"), s)
    x = torch.randn(1, 2, 3, 3, generator=gen(15), dtype=torch.float64)
    x_ref, g_ref = x, gen(16)
    for t in range(49, -1, -1):
        x_ref = ref.step(model(x_ref, torch.tensor(t)), t, x_ref, generator=g_ref).prev_sample
    got = ddpm_sample(model, x, torch.arange(49, -1, -1), s, generator=gen(16), variance="beta")
    torch.testing.assert_close(got, x_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_single_steps_match_diffusers_float32(prediction):
    """Stock diffusers (float32 tables) against our float64 tables cast to float32: step-for-step agreement."""
    s = NoiseSchedule.from_name("scaled_linear", 1000)
    model = random_linear_model(4, 1000, dtype=torch.float32)
    ddim = DDIMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=False, set_alpha_to_one=False,
                         **DIFFUSERS_SCHEDULE["scaled_linear"])
    ddim.set_timesteps(20)
    ddpm = DDPMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=False,
                         **DIFFUSERS_SCHEDULE["scaled_linear"])
    ddpm.set_timesteps(20)
    chain = s.respace(ddpm.timesteps)
    x = torch.randn(2, 4, 8, 8, generator=gen(17))
    for i, t in enumerate(ddim.timesteps.tolist()):
        out = model(x, torch.tensor(t))
        t_prev = t - 50 if t >= 50 else -1
        ref = ddim.step(out, t, x).prev_sample
        ours, _ = ddim_step(s, out, x, t, t_prev, prediction=prediction, final_alpha_cumprod=float(s.alphas_cumprod[0]))
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        noise = torch.randn(x.shape, generator=gen(100 + i))
        ref = ddpm.step(out, t, x, generator=gen(100 + i)).prev_sample
        ours, _ = ddpm_step(chain, out, x, 19 - i, noise=noise, prediction=prediction)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        x = ref


def test_dynamic_threshold_matches_diffusers_thresholding():
    s = NoiseSchedule.from_name("linear", 1000)
    ref = in_float64(DDIMScheduler(thresholding=True, sample_max_value=1e9, clip_sample=False), s)
    ref.set_timesteps(10)
    x = 3 * torch.randn(2, 3, 4, 4, generator=gen(18), dtype=torch.float64)
    out = 4 * torch.randn(2, 3, 4, 4, generator=gen(19), dtype=torch.float64)
    expected = ref.step(out, 900, x, use_clipped_model_output=True)
    ours, ours_x0 = ddim_step(s, out, x, 900, 800, clip_x0=dynamic_threshold)
    torch.testing.assert_close(ours_x0, expected.pred_original_sample)
    torch.testing.assert_close(ours, expected.prev_sample)


# ---------------------------------------------------------------- sampler contract


def test_samplers_share_one_signature_and_can_stop_early():
    for sampler in SAMPLERS.values():
        params = inspect.signature(sampler).parameters
        assert list(params)[:4] == ["model_fn", "x", "timesteps", "schedule"]
        assert params["generator"].kind is inspect.Parameter.KEYWORD_ONLY
    s = NoiseSchedule.from_name("linear", 100)
    model = random_linear_model(2, 100)
    x = torch.randn(1, 2, 3, 3, generator=gen(20), dtype=torch.float64)
    ts = spaced_timesteps(100, 10, "leading")  # 90, 80, …, 0
    for sampler, options in ((ddim_sample, dict(eta=0.5)), (ddpm_sample, {})):
        _, full = sampler(model, x, ts, s, generator=gen(21), return_intermediates=True, **options)
        head = sampler(model, x, ts[:4], s, generator=gen(21), stop_at=int(ts[4]), **options)
        torch.testing.assert_close(head, full["x_t"][3])  # x at level ts[4] = 50, before its model call
    with pytest.raises(ValueError):
        ddim_sample(model, x, ts.flip(0), s)


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
