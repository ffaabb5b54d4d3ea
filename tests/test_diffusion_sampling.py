"""The samplers against a Gaussian oracle (exact E[ε | x_t]: the moments and the flow they must reproduce) and
against the diffusers schedulers as the reference implementation of DDPM and DDIM steps (float64, step by step)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from components.diffusion import (
    Denoiser,
    NoiseSchedule,
    batch_noise,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    dynamic_threshold,
    extract,
    spaced_timesteps,
    static_threshold,
)
from diffusion_reference import DIFFUSERS_PREDICTION, DIFFUSERS_SCHEDULE, SCHEDULE_NAMES, gen, in_float64, random_linear_model

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
    x0 = ddpm_sample(gaussian_oracle(s), x_T, ts, s, noise=batch_noise(gen(9)), fixed_variance=variance)
    assert x0.mean().item() == pytest.approx(MU, abs=0.05)
    assert x0.std().item() == pytest.approx(SIGMA, rel=0.08)


# ---------------------------------------------------------------- diffusers as the reference implementation


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
        denoiser = Denoiser(model, prediction=prediction, clip_x0=static_threshold if clip else None)
        got, inter = ddim_sample(
            denoiser, x, ref.timesteps, s, noise=batch_noise(gen(12)), eta=eta, final_alpha_cumprod=final,
            return_intermediates=True,
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
        Denoiser(model, prediction=prediction, learned_variance=learned), x, ref.timesteps, s,
        noise=batch_noise(gen(14)), fixed_variance="beta" if variance_type == "fixed_large" else "beta_tilde",
        return_intermediates=True,
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
    got = ddpm_sample(model, x, torch.arange(49, -1, -1), s, noise=batch_noise(gen(16)), fixed_variance="beta")
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
