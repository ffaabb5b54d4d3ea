"""The contract every registered sampler keeps (after diffusers' SchedulerCommonTest): one base class of
checks, one subclass per sampler that names it and the options that make it stochastic. A sampler added
to SAMPLERS without a subclass here fails test_every_registered_sampler_has_a_contract_test.

The checks: one signature (samplers.py), output shape, dtype and finiteness, the noise stream as the only
randomness (same seed, same output), per-sample streams making a sample independent of its batch-mates
(within README's rounding promise, tests/rounding.py), extra_args reaching the model untouched, the
Denoiser's learned-variance split, bad timestep sequences refused naming them, stop_at where supported,
and run_sampler as the one entry.
"""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from components.common.images import to_uint8
from components.diffusion import (
    SAMPLERS,
    Denoiser,
    NoiseSchedule,
    batch_noise,
    config_options,
    per_sample_noise,
    run_sampler,
    sample_generator,
    sampler_options,
    spaced_timesteps,
)
from components.dit.config import SCORE_SAMPLER_FIELDS, SamplingConfig
from components.superres.config import SuperResSamplingConfig
from diffusion_reference import gen, random_linear_model
from rounding import assert_same_up_to_rounding

pytestmark = pytest.mark.usefixtures("one_thread")

T = 100
CHANNELS = 2
# Options that are the samplers' own business, not settings a sampling config carries.
SAMPLER_ONLY_OPTIONS = {"stop_at", "return_intermediates", "progress", "variance", "final_alpha_cumprod"}


def streams(n: int, seed: int = 0, first: int = 0) -> list[torch.Generator]:
    return [sample_generator(seed, first + i) for i in range(n)]


class SamplerContract:
    """Subclasses set ``name`` and ``options`` (keyword options that make the sampler draw noise)."""

    name: str
    options: dict = {}

    @property
    def sampler(self):
        return SAMPLERS[self.name]

    def setup_method(self):
        self.schedule = NoiseSchedule.from_name("linear", T)
        self.timesteps = spaced_timesteps(T, 5, "trailing")  # 99, 79, …, 19
        self.model = random_linear_model(CHANNELS, T, dtype=torch.float32)

    def run(self, x, seed=0, first=0, model=None, **options):
        noise = per_sample_noise(streams(len(x), seed, first))
        return self.sampler(model or self.model, x, self.timesteps, self.schedule, noise=noise,
                            **{**self.options, **options})

    def x(self, n=4, dtype=torch.float32, seed=1):
        return torch.randn(n, CHANNELS, 3, 3, generator=gen(seed), dtype=dtype)

    def test_one_signature(self):
        params = inspect.signature(self.sampler).parameters
        assert list(params)[:4] == ["denoiser", "x", "timesteps", "schedule"]
        for name in ("noise", "extra_args"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None
        options = sampler_options(self.name)
        assert all(params[o].kind is inspect.Parameter.KEYWORD_ONLY for o in options)
        # the options carry the config's names: a setting is the same word in YAML, CLI and code
        config_fields = set(SamplingConfig.model_fields) | set(SuperResSamplingConfig.model_fields)
        assert set(options) - SAMPLER_ONLY_OPTIONS <= config_fields, set(options) - config_fields
        assert inspect.getdoc(self.sampler).splitlines()[0].strip(), "a one-line docstring naming the paper"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_output_shape_dtype_and_finite(self, dtype):
        x = self.x(dtype=dtype)
        out = self.run(x, model=lambda x_t, t: self.model(x_t.float(), t).to(x_t.dtype))
        assert out.shape == x.shape and out.dtype == dtype
        assert bool(torch.isfinite(out).all())

    def test_same_seed_same_output_and_the_stream_is_the_only_randomness(self):
        x = self.x()
        torch.manual_seed(123)
        first = self.run(x)
        torch.manual_seed(456)  # the global generator plays no part when a stream is given
        assert torch.equal(first, self.run(x))
        assert not torch.equal(first, self.run(x, seed=1))
        with_batch_stream = self.sampler(self.model, x, self.timesteps, self.schedule, noise=batch_noise(gen(3)),
                                         **self.options)
        assert torch.equal(with_batch_stream, self.sampler(self.model, x, self.timesteps, self.schedule,
                                                           noise=batch_noise(gen(3)), **self.options))

    def test_per_sample_streams_make_a_sample_independent_of_its_batch_mates(self):
        x = self.x(n=5)
        full = to_uint8(self.run(x))
        alone = to_uint8(self.run(x[3:], first=3))  # samples 3 and 4 without the others
        assert_same_up_to_rounding(alone, full[3:])
        mates = x.clone()
        mates[:3] = self.x(n=3, seed=9)  # other batch-mates, same streams
        assert_same_up_to_rounding(to_uint8(self.run(mates))[3:], full[3:])

    def test_extra_args_reach_the_model_untouched(self):
        seen = []
        labels, text = torch.tensor([1, 0, 2, 1]), object()  # an object no code could copy or convert

        def model(x_t, t, y, text_embedding):
            seen.append((y, text_embedding, t))
            return self.model(x_t, t)

        noise = per_sample_noise(streams(4))
        self.sampler(model, self.x(), self.timesteps, self.schedule, noise=noise,
                     extra_args={"y": labels, "text_embedding": text}, **self.options)
        assert seen and all(y is labels and emb is text for y, emb, _ in seen)
        assert all(t.dtype == torch.long and t.shape == (4,) for _, _, t in seen)
        assert {int(t[0]) for _, _, t in seen} <= set(self.timesteps.tolist())

    def test_the_denoiser_splits_off_a_learned_variance(self):
        twice = random_linear_model(CHANNELS, T, learned_variance=True, dtype=torch.float32)
        out = self.run(self.x(), model=Denoiser(twice, learned_variance=True))
        assert out.shape == self.x().shape and bool(torch.isfinite(out).all())
        with pytest.raises(ValueError, match="learned variance needs 4 output channels"):
            self.run(self.x(), model=Denoiser(self.model, learned_variance=True))
        if self.name != "ddpm":  # only DDPM's step uses Σ; the others must ignore the variance half
            mean_only = lambda x_t, t: twice(x_t, t)[:, :CHANNELS]  # noqa: E731
            assert torch.equal(out, self.run(self.x(), model=mean_only))

    @pytest.mark.parametrize("bad", [[10, 20], [], [100, 50], [50, 50], [5, -1]])
    def test_a_bad_timestep_sequence_is_refused_naming_it(self, bad):
        with pytest.raises(ValueError, match=r"timesteps .*got \[" + ", ".join(map(str, bad))):
            self.sampler(self.model, self.x(), torch.tensor(bad, dtype=torch.long), self.schedule, **self.options)

    def test_intermediates_follow_the_timesteps(self):
        _, inter = self.run(self.x(), return_intermediates=True)
        assert inter["t"] == self.timesteps.tolist()
        assert len(inter["x_t"]) == len(inter["pred_x0"]) == len(self.timesteps)

    def test_stop_at_where_supported(self):
        x = self.x()
        if "stop_at" not in sampler_options(self.name):
            with pytest.raises(ValueError, match=f"the {self.name} sampler does not take stop_at"):
                run_sampler(self.name, self.model, x, self.timesteps, self.schedule, stop_at=10, **self.options)
            return
        _, full = self.run(x, return_intermediates=True)
        head = self.sampler(self.model, x, self.timesteps[:3], self.schedule, noise=per_sample_noise(streams(4)),
                            stop_at=int(self.timesteps[3]), **self.options)
        torch.testing.assert_close(head, full["x_t"][2])  # x at level timesteps[3], before its model call
        with pytest.raises(ValueError, match="stop_at"):
            self.run(x, stop_at=int(self.timesteps[-1]))

    def test_run_sampler_is_the_sampler_and_refuses_what_it_does_not_take(self):
        x = self.x()
        direct = self.run(x)
        noise = per_sample_noise(streams(4))
        assert torch.equal(run_sampler(self.name, self.model, x, self.timesteps, self.schedule, noise=noise,
                                       stop_at=None, **self.options), direct)
        with pytest.raises(ValueError, match=f"the {self.name} sampler does not take n_steps_each"):
            run_sampler(self.name, self.model, x, self.timesteps, self.schedule, n_steps_each=3)


class TestDDPM(SamplerContract):
    name = "ddpm"


class TestDDIM(SamplerContract):
    name = "ddim"
    options = {"eta": 0.5}  # η = 0 draws nothing: see test_deterministic_ddim_draws_no_noise

    def test_deterministic_ddim_draws_no_noise(self):
        def refuse(like):
            raise AssertionError("η = 0 must not draw")

        x = self.x()
        out = self.sampler(self.model, x, self.timesteps, self.schedule, noise=refuse, eta=0.0)
        assert torch.equal(out, self.sampler(self.model, x, self.timesteps, self.schedule))


class TestLangevin(SamplerContract):
    name = "langevin"
    options = {"langevin_steps": 2}


class TestPredictorCorrector(SamplerContract):
    name = "pc"
    options = {"corrector_steps": 1}


class TestConsistency(SamplerContract):
    name = "consistency"  # re-noises between its model calls: draws with no option set


def test_every_registered_sampler_has_a_contract_test():
    covered = {cls.name for cls in SamplerContract.__subclasses__()}
    assert covered == set(SAMPLERS)


def test_run_sampler_refuses_an_unknown_sampler_naming_the_choices():
    s = NoiseSchedule.from_name("linear", T)
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; choose one of \['consistency', 'ddim', 'ddpm', 'langevin', 'pc'\]"):
        run_sampler("euler", random_linear_model(CHANNELS, T), torch.zeros(1, CHANNELS, 3, 3), torch.tensor([50]), s)


def test_per_sample_noise_refuses_a_batch_of_another_size():
    with pytest.raises(ValueError, match="a batch of 3 samples but 2 noise generators"):
        per_sample_noise(streams(2))(torch.zeros(3, 1))


def test_a_sampling_config_feeds_each_sampler_exactly_its_options_by_name():
    """The DiT config's per-sampler fields are the samplers' option names: generate() picks them by name."""
    offered = typing.get_args(SamplingConfig.model_fields["sampler"].annotation)
    assert set(offered) == set(SAMPLERS) - {"consistency"}  # a consistency student's own chain, not a DiT's
    assert config_options("consistency", SamplingConfig(eta=0.3)) == {}
    for name in offered:
        picked = config_options(name, SamplingConfig(sampler=name, eta=0.3, langevin_steps=3))
        expected = {"ddim": {"eta"}, "ddpm": {"fixed_variance"}}.get(name, set(SCORE_SAMPLER_FIELDS.get(name, ())))
        assert set(picked) == expected, name
    assert config_options("langevin", SamplingConfig(sampler="langevin", langevin_steps=3))["langevin_steps"] == 3
    assert config_options("ddim", SuperResSamplingConfig(eta=0.5)) == {"eta": 0.5}
