"""The score-based samplers (components/diffusion/score.py) against a Gaussian oracle, their exact one-step
formulas, their contract with the other samplers, and generate()'s per-sample determinism with them.

Data x_0 ~ N(μ, s²I): the VP marginal is q_t = N(√ᾱ_t μ, v_t I), v_t = ᾱ_t s² + 1 − ᾱ_t, so the true score
−(x − √ᾱ_t μ)/v_t and the exact E[ε | x_t], E[x_0 | x_t] are known in closed form.
"""

from __future__ import annotations

import pytest
import torch

from components.diffusion import (
    SAMPLERS,
    Denoiser,
    NoiseSchedule,
    batch_noise,
    ddpm_sample,
    extract,
    langevin_sample,
    pc_sample,
    score_from_model_output,
    per_sample_noise,
    run_sampler,
    sample_generator,
    spaced_timesteps,
    v_from_x0_eps,
)
import metas
from rounding import assert_same_up_to_rounding

MU, SIGMA = 0.5, 0.6
# The snr step rule uses each sample's own score norm, whose fluctuation biases the variance by O(1/d): 128
# numbers per sample keep it near the discretisation's own bias (the moment tests below measured std +1.5% to
# +2.0% with d = 128, up to +2.6% with d = 64).
DIM = 128

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def marginal(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor):
    """(mean, variance) of q_t, shaped to broadcast against x."""
    a = extract(schedule.alphas_cumprod, t, x)
    return a.sqrt() * MU, a * SIGMA**2 + 1 - a


def oracle(schedule: NoiseSchedule, prediction: str = "eps"):
    """The exact model: E[ε | x_t], E[x_0 | x_t] or E[v | x_t] (v is linear in x_0 and ε)."""

    def model_fn(x, t):
        a = extract(schedule.alphas_cumprod, t, x)
        mean, var = marginal(schedule, t, x)
        eps = (1 - a).sqrt() * (x - mean) / var  # Cov(ε, x_t) = √(1−ᾱ)
        x0 = MU + a.sqrt() * SIGMA**2 * (x - mean) / var  # Cov(x_0, x_t) = √ᾱ s²
        return {"eps": eps, "x0": x0, "v": v_from_x0_eps(schedule, x0, t, eps)}[prediction]

    return model_fn


def assert_gaussian_moments(x0: torch.Tensor, mean_tol: float, std_rel: float):
    assert x0.mean().item() == pytest.approx(MU, abs=mean_tol)
    assert x0.std().item() == pytest.approx(SIGMA, rel=std_rel)


# ---------------------------------------------------------------- the score


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_score_is_the_closed_form_score_of_the_marginal(name, prediction):
    s = NoiseSchedule.from_name(name, 1000)
    model = oracle(s, prediction)
    for level in (0, 10, 250, 500, 900):
        t = torch.full((64,), level)
        mean, var = marginal(s, t, torch.zeros(64, 8, dtype=torch.float64))
        x_t = mean + var.sqrt() * torch.randn(64, 8, generator=gen(level), dtype=torch.float64)
        expected = -(x_t - mean) / var
        torch.testing.assert_close(score_from_model_output(s, model(x_t, t), x_t, t, prediction), expected)
        # an int level means that level for the whole batch
        torch.testing.assert_close(score_from_model_output(s, model(x_t, t), x_t, level, prediction), expected)


def test_score_honours_clip_x0():
    s = NoiseSchedule.from_name("linear", 100)
    x_t = 3 * torch.randn(4, 2, generator=gen(1), dtype=torch.float64)
    t = torch.full((4,), 20)
    clipped = score_from_model_output(s, torch.zeros_like(x_t), x_t, t, "x0", clip_x0=lambda x0: x0 + 1)
    a = float(s.alphas_cumprod[20])
    torch.testing.assert_close(clipped, -(x_t - a**0.5) / (1 - a))  # the score of x̂_0 = 1: −ε̂/σ, ε̂ = (x − √ᾱ)/σ


# ---------------------------------------------------------------- exact single steps


def fixed_noise(z: torch.Tensor):
    return lambda like: z


@pytest.mark.parametrize("rule", ["snr", "classic"])
def test_one_langevin_step_then_tweedie(rule):
    s = NoiseSchedule.from_name("linear", 1000)
    model, t = oracle(s), 300
    x = torch.randn(8, DIM, generator=gen(2), dtype=torch.float64)
    z = torch.randn(8, DIM, generator=gen(3), dtype=torch.float64)
    a, alpha = float(s.alphas_cumprod[t]), float(s.alphas[t])
    options = dict(snr=0.2) if rule == "snr" else dict(langevin_step_size=0.7)
    out = langevin_sample(model, x, torch.tensor([t]), s, noise=fixed_noise(z), langevin_steps=1, **options)

    mean, var = marginal(s, torch.full((8,), t), x)
    score = -(x - mean) / var
    if rule == "snr":  # ε = 2α (r ‖z‖/‖s‖)², ‖z‖ → √d
        eps = 2 * alpha * (0.2 * DIM**0.5 / score.norm(dim=1, keepdim=True)) ** 2
    else:  # ε = c (1 − ᾱ_t)
        eps = 0.7 * (1 - a)
    x1 = x + eps * score + (2 * eps) ** 0.5 * z
    x0 = (x1 + (1 - a) * (-(x1 - mean) / var)) / a**0.5  # Tweedie at the last (only) level
    torch.testing.assert_close(out, x0)


def test_one_reverse_diffusion_predictor_step():
    s = NoiseSchedule.from_name("cosine", 1000)
    model = oracle(s)
    x = torch.randn(4, DIM, generator=gen(4), dtype=torch.float64)
    z = torch.randn(4, DIM, generator=gen(5), dtype=torch.float64)
    out = pc_sample(model, x, torch.tensor([600]), s, noise=fixed_noise(z), pc_predictor="reverse_diffusion",
                    stop_at=550)
    beta = 1 - float(s.alphas_cumprod[600] / s.alphas_cumprod[550])  # the respaced chain's β'
    mean, var = marginal(s, torch.full((4,), 600), x)
    expected = (2 - (1 - beta) ** 0.5) * x - beta * (x - mean) / var + beta**0.5 * z
    torch.testing.assert_close(out, expected)


def test_pc_without_corrector_is_ancestral_sampling():
    # The ancestral predictor is DDPM's step with σ² = β' (Song et al. 2021's ancestral sampling): same samples.
    s = NoiseSchedule.from_name("linear", 1000)
    model = oracle(s, "v")
    x = torch.randn(16, 4, generator=gen(6), dtype=torch.float64)
    ts = spaced_timesteps(1000, 10, "trailing")
    denoiser = Denoiser(model, prediction="v")
    pc = pc_sample(denoiser, x, ts, s, noise=batch_noise(gen(7)), corrector_steps=0)
    ddpm = ddpm_sample(denoiser, x, ts, s, noise=batch_noise(gen(7)), fixed_variance="beta")
    torch.testing.assert_close(pc, ddpm)


# ---------------------------------------------------------------- sampling the Gaussian from pure noise


@pytest.mark.parametrize("rule", ["snr", "classic"])
def test_langevin_reproduces_the_gaussian(rule):
    s = NoiseSchedule.from_name("linear", 1000)
    x_T = torch.randn(1000, DIM, generator=gen(8), dtype=torch.float64)
    options = dict(langevin_step_size=1.0) if rule == "classic" else {}
    x0 = langevin_sample(oracle(s), x_T, spaced_timesteps(1000, 50, "trailing"), s, noise=batch_noise(gen(9)),
                         langevin_steps=10, **options)
    # measured: mean 0.489 / 0.491, std +2.0% / +2.0% (snr / classic). The chain lags its moving target a little
    # (mean) and unadjusted Langevin overshoots the variance (std); both shrink with more steps per level.
    assert_gaussian_moments(x0, mean_tol=0.02, std_rel=0.04)


@pytest.mark.parametrize("predictor,steps", [("ancestral", 50), ("reverse_diffusion", 100)])
def test_pc_reproduces_the_gaussian(predictor, steps):
    s = NoiseSchedule.from_name("cosine", 1000)
    x_T = torch.randn(2000, DIM, generator=gen(10), dtype=torch.float64)
    x0 = pc_sample(oracle(s), x_T, spaced_timesteps(1000, steps, "trailing"), s, noise=batch_noise(gen(11)),
                   pc_predictor=predictor)
    # measured: mean within 0.001, std +1.5% / +1.6% (the corrector's unadjusted Langevin step)
    assert_gaussian_moments(x0, mean_tol=0.01, std_rel=0.03)


# ---------------------------------------------------------------- the sampler contract


@pytest.mark.parametrize("sampler", [langevin_sample, pc_sample], ids=["langevin", "pc"])
def test_determinism_and_intermediates(sampler):
    s = NoiseSchedule.from_name("linear", 100)
    model = oracle(s)
    x = torch.randn(3, 2, 4, 4, generator=gen(12), dtype=torch.float64)
    ts = spaced_timesteps(100, 5, "leading")  # 80, 60, …, 0
    first, inter = sampler(model, x, ts, s, noise=batch_noise(gen(13)), return_intermediates=True)
    assert torch.equal(first, sampler(model, x, ts, s, noise=batch_noise(gen(13))))
    assert not torch.equal(first, sampler(model, x, ts, s, noise=batch_noise(gen(14))))
    assert inter["t"] == ts.tolist() and len(inter["x_t"]) == len(inter["pred_x0"]) == 5
    # a hand-made stream drawing what batch_noise would: the same samples
    stream = gen(13)
    drawn = sampler(model, x, ts, s, noise=lambda like: torch.randn(like.shape, generator=stream, dtype=like.dtype))
    torch.testing.assert_close(drawn, first)


def test_registered_and_stop_at_like_the_other_samplers():
    assert SAMPLERS["langevin"] is langevin_sample and SAMPLERS["pc"] is pc_sample
    s = NoiseSchedule.from_name("linear", 100)
    model = oracle(s)
    x = torch.randn(2, 3, generator=gen(15), dtype=torch.float64)
    ts = spaced_timesteps(100, 10, "leading")  # 90, 80, …, 0
    _, full = pc_sample(model, x, ts, s, noise=batch_noise(gen(16)), corrector_steps=2, return_intermediates=True)
    head = pc_sample(model, x, ts[:4], s, noise=batch_noise(gen(16)), corrector_steps=2, stop_at=int(ts[4]))
    torch.testing.assert_close(head, full["x_t"][3])  # x at level 50, before its corrector and model call


def test_bad_arguments_are_rejected():
    s = NoiseSchedule.from_name("linear", 100)
    model, x = oracle(s), torch.zeros(2, 3, dtype=torch.float64)
    for sampler in (langevin_sample, pc_sample):
        for bad in (torch.tensor([10, 20]), torch.tensor([], dtype=torch.long), torch.tensor([100, 50]),
                    torch.tensor([50, 50]), torch.tensor([5, -1])):
            with pytest.raises(ValueError, match="timesteps"):
                sampler(model, x, bad, s)
    with pytest.raises(ValueError, match="stop_at"):
        pc_sample(model, x, torch.tensor([50, 20]), s, stop_at=20)
    with pytest.raises(ValueError, match="predictor"):
        pc_sample(model, x, torch.tensor([50]), s, pc_predictor="euler")
    with pytest.raises(ValueError, match="corrector_steps"):
        pc_sample(model, x, torch.tensor([50]), s, corrector_steps=-1)
    with pytest.raises(ValueError, match="langevin_steps"):
        langevin_sample(model, x, torch.tensor([50]), s, langevin_steps=0)
    with pytest.raises(TypeError):  # a Langevin chain ends at clean data
        langevin_sample(model, x, torch.tensor([50]), s, stop_at=10)


# ---------------------------------------------------------------- generate(): config, dispatch, determinism


LATENT = [4, 4, 4]
CLASSES = 3


def untrained_dit(learn_sigma: bool):
    from components.dit.model import build_dit

    torch.manual_seed(0)
    dit = build_dit("DiT-Micro/2", input_size=LATENT[1], in_channels=LATENT[0], num_classes=CLASSES,
                    learn_sigma=learn_sigma)
    with torch.no_grad():  # adaLN-Zero starts at a zero output: perturb so the samples depend on the model
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = metas.dit_meta(schedule="scaled_linear", num_timesteps=1000, prediction="eps", learn_sigma=learn_sigma,
                          num_classes=CLASSES, null_label=dit.null_class_id, latent_shape=LATENT)
    return dit.eval(), meta


def tiny_autoencoder():
    from components.autoencoder.model import build_autoencoder

    torch.manual_seed(1)
    ae = build_autoencoder("ae-tiny", in_channels=1).eval()
    return ae, metas.ae_meta(latent_shape=LATENT, scale_factor=0.8, image_size=8, channels=1)


def sampling(**settings):
    from components.dit.config import SamplingConfig

    return SamplingConfig(steps=4, guidance=1.0, **settings)


@pytest.mark.parametrize("settings", [
    dict(sampler="pc"),
    dict(sampler="pc", pc_predictor="reverse_diffusion", corrector_steps=2, thresholding="dynamic"),
    dict(sampler="langevin", langevin_steps=2),
    dict(sampler="langevin", langevin_steps=2, langevin_step_size=0.5),
], ids=["pc", "pc-reverse-diffusion", "langevin", "langevin-classic"])
def test_generate_is_deterministic_whatever_the_batch_size(settings):
    from components.dit.generate import generate

    config = sampling(**settings)
    dit, meta = untrained_dit(learn_sigma=settings["sampler"] == "pc")
    ae, ae_meta = tiny_autoencoder()
    labels = [0, 1, 2, 2, 1, 0, 1]
    images = generate(dit, meta, ae, ae_meta, labels, config, batch_size=7)
    assert images.shape == (7, 1, 8, 8) and images.dtype == torch.uint8
    assert_same_up_to_rounding(images, generate(dit, meta, ae, ae_meta, labels, config, batch_size=3))
    assert_same_up_to_rounding(images[:2], generate(dit, meta, ae, ae_meta, labels[:2], config))
    assert not torch.equal(images, generate(dit, meta, ae, ae_meta, labels, config.model_copy(update={"seed": 1})))
    ddim = generate(dit, meta, ae, ae_meta, labels, sampling())
    assert not torch.equal(images, ddim)  # the setting reached a different sampler


def test_run_sampler_rejects_a_truncated_langevin_chain():
    s = NoiseSchedule.from_name("linear", 100)
    with pytest.raises(ValueError, match="stop_at"):
        run_sampler("langevin", oracle(s), torch.zeros(1, 2), torch.tensor([50]), s,
                    noise=per_sample_noise([sample_generator(0, 0)]), stop_at=10)


def test_config_keeps_ddim_and_ddpm_json_and_flags_reach_it():
    from components.dit.config import SamplingConfig
    from pipelines.sample import BadFlag, sampling_config

    before = {"sampler", "steps", "spacing", "guidance", "eta", "thresholding", "dynamic_threshold_percentile", "seed"}
    for name in ("ddim", "ddpm"):  # their JSON (the DiT and evaluate cache keys) is what it was before
        assert set(SamplingConfig(sampler=name, snr=0.3).model_dump(mode="json")) == before
    pc = SamplingConfig(sampler="pc", corrector_steps=2).model_dump(mode="json")
    assert set(pc) == before | {"snr", "corrector_steps", "pc_predictor"} and pc["corrector_steps"] == 2
    langevin = SamplingConfig(sampler="langevin").model_dump(mode="json")
    assert set(langevin) == before | {"snr", "langevin_steps", "langevin_step_size"}
    assert SamplingConfig(**langevin) == SamplingConfig(sampler="langevin")

    config = sampling_config({"sampler": "ddim", "steps": 7}, sampler="pc", snr=0.3, corrector_steps=None)
    assert (config.sampler, config.steps, config.snr, config.corrector_steps) == ("pc", 7, 0.3, 1)
    with pytest.raises(BadFlag, match="--corrector-steps"):
        sampling_config(None, sampler="pc", corrector_steps=-1)
    with pytest.raises(BadFlag, match="--sampler"):
        sampling_config(None, sampler="euler")


def write_workflow(root) -> None:
    """An autoencoder and a DiT step (untrained weights in their real file formats) and the summary that
    `latentflow sample` reads, as ``latentflow run`` leaves them."""
    import json

    from safetensors.torch import save

    from components.autoencoder.load import AE_META, AE_WEIGHTS
    from components.autoencoder.model import AUTOENCODER_PRESETS
    from components.common.step import FileRecord, Manifest
    from components.common.storage import Storage
    from components.dit.load import DIT_META, DIT_WEIGHTS
    from components.dit.model import DIT_PRESETS

    ae, _ = tiny_autoencoder()
    dit, dit_meta = untrained_dit(learn_sigma=False)
    ae_meta = metas.ae_meta(model={**AUTOENCODER_PRESETS["ae-tiny"], "in_channels": 1}, latent_shape=LATENT,
                            scale_factor=0.8, scale_from="none", classes=["a", "b", "c"]).to_json()
    dit_meta.model = {**DIT_PRESETS["DiT-Micro/2"], "input_size": LATENT[1], "in_channels": LATENT[0],
                      "num_classes": CLASSES, "learn_sigma": False}
    dit_meta = dit_meta.to_json()
    records = []
    for name, files in (("autoencoder", {AE_WEIGHTS: save(ae.state_dict()), AE_META: json.dumps(ae_meta).encode()}),
                        ("dit", {DIT_WEIGHTS: save(dit.state_dict()), DIT_META: json.dumps(dit_meta).encode()})):
        out = Storage.from_uri(str(root / "steps" / name))
        for rel, data in files.items():
            out.write_bytes(rel, data)
        manifest = Manifest(step=name, cache_key="k", code_version="1", location=out.uri(), upstream={},
                            config={"sample": sampling().model_dump()} if name == "dit" else {},
                            files=[FileRecord(rel, out.sha256(rel), out.size(rel)) for rel in sorted(files)])
        out.write_text("manifest.json", manifest.to_json())
        records.append({"name": name, "status": "ran", "cache_key": "k", "manifest_uri": out.uri("manifest.json")})
    Storage.from_uri(str(root)).write_text("workflows/wf/summary.json",
                                           json.dumps({"workflow_id": "wf", "steps": records}))


def test_cli_sample_runs_the_score_samplers(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    help_text = CliRunner().invoke(app, ["sample", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    for text in ("langevin", "predictor-corrector", "--snr", "--corrector-steps", "--pc-predictor",
                 "--langevin-steps", "--langevin-step-size"):
        assert text in help_text, text

    write_workflow(tmp_path)
    common = ["sample", "--workflow-id", "wf", "--storage", str(tmp_path), "--labels", "0,2", "--per-label", "2"]
    pc = CliRunner().invoke(app, [*common, "--sampler", "pc", "--corrector-steps", "2", "--snr", "0.1",
                                  "--out", str(tmp_path / "pc")])
    assert pc.exit_code == 0, pc.output
    assert "pc, 4 steps" in pc.output and "ancestral predictor, 2 corrector steps, snr 0.1" in pc.output
    assert len(list((tmp_path / "pc").rglob("*.png"))) == 5  # 2 labels x 2 images, and the grid
    langevin = CliRunner().invoke(app, [*common, "--sampler", "langevin", "--langevin-steps", "2",
                                        "--langevin-step-size", "0.5", "--out", str(tmp_path / "langevin")])
    assert langevin.exit_code == 0, langevin.output
    assert "langevin, 4 steps" in langevin.output and "2 steps per level, step size 0.5" in langevin.output
    assert (tmp_path / "pc" / "0" / "0.png").read_bytes() != (tmp_path / "langevin" / "0" / "0.png").read_bytes()
    bad = CliRunner().invoke(app, [*common, "--sampler", "pc", "--corrector-steps", "-1", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--corrector-steps" in bad.output
