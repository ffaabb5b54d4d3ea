"""The distillation math against closed forms: progressive-distillation targets, the truncated SNR
weight, consistency-model scalings, the probability-flow ODE step, distances."""

from __future__ import annotations

import pytest
import torch

from components.diffusion import NoiseSchedule, q_sample
from components.distill.targets import (
    alpha_sigma,
    consistency_scalings,
    ddim_step_x0,
    distance,
    halve_steps,
    karras_sigmas,
    ode_step,
    progressive_target,
    pseudo_huber,
    truncated_snr_weight,
    ve_sigma,
)

SCHEDULE = NoiseSchedule.from_name("scaled_linear", 1000)


def test_progressive_target_makes_one_student_step_land_on_two_teacher_steps():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t, t1, t2 = torch.full((4,), 700), torch.full((4,), 600), torch.full((4,), 500)
    z_t = q_sample(SCHEDULE, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))

    def teacher(z, level):  # an imperfect teacher: its x0 guess depends on z and the level
        return 0.8 * z.tanh() + 0.001 * level.view(-1, 1, 1, 1)

    z_t1 = ddim_step_x0(SCHEDULE, z_t, teacher(z_t, t), t, t1)
    z_t2 = ddim_step_x0(SCHEDULE, z_t1, teacher(z_t1, t1), t1, t2)
    target = progressive_target(SCHEDULE, z_t, z_t2, t, t2)
    torch.testing.assert_close(ddim_step_x0(SCHEDULE, z_t, target, t, t2), z_t2)
    # an exact teacher (it knows x0) makes the target x0 itself: DDIM is consistent along its path
    z_t1 = ddim_step_x0(SCHEDULE, z_t, x0, t, t1)
    z_t2 = ddim_step_x0(SCHEDULE, z_t1, x0, t1, t2)
    torch.testing.assert_close(progressive_target(SCHEDULE, z_t, z_t2, t, t2), x0)
    # the last student step ends on clean data: the target is the teacher's final sample
    final = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(progressive_target(SCHEDULE, z_t, final, t, torch.full((4,), -1)), final)


def test_truncated_snr_weight_and_rounds():
    like = torch.zeros(3, 1)
    levels = torch.tensor([0, 400, 999])
    a, s = alpha_sigma(SCHEDULE, levels, like)
    weight = truncated_snr_weight(SCHEDULE, levels, like)
    assert torch.allclose(weight, torch.maximum(a**2 / s**2, torch.ones_like(a)))
    assert weight[0] > 100 and weight[2] == 1
    assert halve_steps(torch.tensor([900, 700, 500, 300])).tolist() == [900, 500]
    with pytest.raises(ValueError, match="even"):
        halve_steps(torch.tensor([900, 700, 500]))


def test_consistency_scalings_make_f_the_identity_at_sigma_min():
    sigma_min = float(ve_sigma(SCHEDULE, torch.tensor([0])))
    c_skip, c_out = consistency_scalings(torch.tensor([sigma_min, 1.0, 80.0], dtype=torch.float64), sigma_min)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[2] < 1e-4 and c_out[2] == pytest.approx(0.5, rel=1e-3)
    sigmas = ve_sigma(SCHEDULE, torch.tensor([0, 500, 999]))
    assert (sigmas.diff() > 0).all() and sigmas[0] < 0.05 and sigmas[2] > 10
    k = karras_sigmas(18, 0.002, 80.0)
    assert k[0] == pytest.approx(0.002) and k[-1] == pytest.approx(80.0) and (k.diff() > 0).all()


def test_ode_step_follows_the_exact_flow_of_gaussian_data():
    """x0 ~ N(0, s^2): D(x, sigma) = s^2 / (s^2 + sigma^2) x, and the probability-flow ODE moves x
    along x(sigma) = x(sigma0) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma0^2)."""
    s = 0.5
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3

    def denoiser(x, sigma):
        sigma = sigma.view(-1, 1, 1, 1)
        return s**2 / (s**2 + sigma**2) * x

    sigma, sigma_next = torch.full((64,), 2.0, dtype=torch.float64), torch.full((64,), 1.9, dtype=torch.float64)
    exact = x * ((s**2 + 1.9**2) / (s**2 + 2.0**2)) ** 0.5
    heun_error = (ode_step(denoiser, x, sigma, sigma_next, "heun") - exact).abs().max()
    euler_error = (ode_step(denoiser, x, sigma, sigma_next, "euler") - exact).abs().max()
    assert heun_error < 0.1 * euler_error and heun_error < 1e-4  # second order against first
    # the last step, to sigma 0, is Euler's (no evaluation at sigma = 0) and lands on D(x, sigma)
    to_zero = ode_step(denoiser, x, sigma, torch.zeros(64, dtype=torch.float64), "heun")
    torch.testing.assert_close(to_zero, denoiser(x, sigma))
    with pytest.raises(ValueError, match="solver"):
        ode_step(denoiser, x, sigma, sigma_next, "rk4")


def test_distances():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(distance(a, b, "l2"), torch.full((2,), 0.25))
    assert torch.allclose(distance(a, b, "l1"), torch.full((2,), 0.5))
    c = 0.00054 * 48**0.5
    assert torch.allclose(pseudo_huber(a, b), torch.full((2,), (48 * 0.25 + c**2) ** 0.5 - c))
    tiny = torch.full((2, 3, 4, 4), 1e-5)
    assert torch.allclose(pseudo_huber(a, tiny), (tiny.pow(2).flatten(1).sum(1)) / (2 * c), rtol=1e-3)
    with pytest.raises(ValueError, match="distance"):
        distance(a, b, "lpips")


class TinyV(torch.nn.Module):
    """A v-model with the DiT's call convention (``force_drop_ids``), depending on x, t and y."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x, t, y, force_drop_ids=None):
        return self.mix(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000) + 0.1 * y.float().view(-1, 1, 1, 1)


def test_the_registry_consistency_sampler_is_song_et_al_algorithm_1_in_ve_variables():
    """The registry's ``consistency`` sampler on the student's x̂_0 model against alg. 1 written out in the
    variables the student was trained in (x = x̂_0 + √(σ_k² − σ_min²) z), with the same draws."""
    from components.diffusion import Denoiser, run_sampler
    from components.diffusion.consistency_sampler import top_level_input
    from components.distill.consistency import ConsistencyFunction, consistency_levels

    torch.manual_seed(0)
    model, fn = TinyV(), ConsistencyFunction(SCHEDULE, consistency_levels(SCHEDULE, 12))
    y, top = torch.tensor([0, 3, 7]), int(fn.levels[-1])
    draws = [torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    sample_levels = [int(fn.levels[-4]), int(fn.levels[-8])]

    index = torch.full((3,), len(fn.levels) - 1)
    expected = fn(model, draws[0] * float(fn.sigmas[-1]), index, y)
    for level, z in zip(sample_levels, draws[1:]):
        k = fn.nearest_index(level)
        expected = fn(model, expected + (float(fn.sigmas[k]) ** 2 - fn.sigma_min**2) ** 0.5 * z, torch.full((3,), k), y)

    stream = iter(draws[1:])
    got = run_sampler("consistency", Denoiser(fn.x0_model(model), prediction="x0"),
                      top_level_input(SCHEDULE, draws[0], top), torch.tensor([top, *sample_levels]), SCHEDULE,
                      noise=lambda like: next(stream), extra_args={"y": y})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, fn(model, draws[0] * float(fn.sigmas[-1]), index, y))  # the steps did something
