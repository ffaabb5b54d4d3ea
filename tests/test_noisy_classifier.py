"""The noisy classifier of classifier guidance: trained in one process through the shared loop, it
classifies noisy latents better at low t than at high t, round-trips through its export, and its
guidance moves DDIM samples toward the requested class; the pipeline checks its schedule."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from components.common.train_loop import LocalSession, train_loop
from components.diffusion import NoiseSchedule, ddim_sample, spaced_timesteps
from components.diffusion.classifier_guidance import make_classifier_guided_model_fn
from components.noisy_classifier.config import NoisyClassifierConfig
from components.noisy_classifier.load import NoisyClassifierMeta, load_noisy_classifier
from components.noisy_classifier.model import build_noisy_classifier
from components.noisy_classifier.task import NoisyClassifierTask
from components.noisy_classifier.train import accuracy_by_t
from tests.test_dit import CLASSES, LATENT, synthetic_latents
from rounding import assert_same_up_to_rounding

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(tmp_path) -> tuple[NoisyClassifierConfig, dict]:
    cfg = NoisyClassifierConfig(preset="nc-tiny", schedule="linear", train=dict(
        max_steps=120, batch_size=48, lr=3e-3, ema_decay=0.9, log_every=40, checkpoint_every=1000, warmup_steps=10))
    model = {"channels": 16, "channel_mults": (1, 2), "blocks": 1, "in_channels": LATENT[0],
             "num_classes": len(CLASSES)}
    meta = {"preset": "nc-tiny", "model": model, "schedule": "linear", "num_timesteps": 1000, "classes": CLASSES}
    latents, labels = synthetic_latents(684)
    task = NoisyClassifierTask(cfg, meta, in_memory=(latents[:384], labels[:384]))
    final = train_loop(task, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 120 and final["loss"] < 1.0
    return cfg, meta


def test_trains_exports_and_is_more_accurate_at_low_noise(tmp_path):
    cfg, meta = trained(tmp_path)
    export = sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1] / "export"
    model, loaded_meta = load_noisy_classifier(str(export))
    assert loaded_meta.classes == CLASSES and not model.training
    latents, labels = (part[384:] for part in synthetic_latents(684))  # held out
    rows = accuracy_by_t(model, NoiseSchedule.from_name("linear", 1000), latents, labels, buckets=4)
    assert [r["t_low"] for r in rows] == [0, 250, 500, 750] and rows[-1]["t_high"] == 999
    assert rows[0]["accuracy"] > 0.9 and rows[0]["accuracy"] > rows[-1]["accuracy"] + 0.2, rows
    assert accuracy_by_t(model, NoiseSchedule.from_name("linear", 1000), latents, labels, 4) == rows  # seeded

    # guidance with it, on the Gaussian data's exact eps-model, moves DDIM samples toward the class
    schedule = NoiseSchedule.from_name("linear", 1000)
    oracle = lambda x, t, y: schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1).float() * x  # noqa: E731
    noise = torch.randn(96, *LATENT, generator=torch.Generator().manual_seed(0))
    target = torch.full((96,), 2)
    chosen = []
    for weight in (0.0, 3.0):
        fn = make_classifier_guided_model_fn(oracle, model, schedule, weight, "eps")
        samples = ddim_sample(lambda x, t: fn(x, t, target), noise.clone(), spaced_timesteps(1000, 20, "leading"),
                              schedule)
        with torch.no_grad():
            chosen.append((model(samples, torch.zeros(96, dtype=torch.long)).argmax(1) == 2).float().mean().item())
    assert chosen[1] > chosen[0] + 0.2, chosen


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="nc-small"):
        build_noisy_classifier("resnet", 4, 10)


def test_pipeline_refuses_a_schedule_other_than_the_dits():
    from pipelines.config import PipelineConfig

    base = {"name": "x", "autoencoder": {}, "latents": {}, "dit": {"schedule": "scaled_linear"}}
    PipelineConfig(**base, noisy_classifier={"schedule": "scaled_linear"})
    with pytest.raises(ValueError, match="same forward process"):
        PipelineConfig(**base, noisy_classifier={"schedule": "cosine"})
    with pytest.raises(ValueError, match="needs section"):
        PipelineConfig(name="x", autoencoder={}, noisy_classifier={})


def test_generate_with_classifier_guidance_under_inference_mode():
    """Through ``generate`` (which samples under inference mode): guidance changes the images, they do
    not depend on the batch size, and a classifier of another forward process is refused."""
    from components.dit.config import SamplingConfig
    from components.dit.generate import generate
    from tests.test_dit import tiny_autoencoder, untrained_dit

    dit, meta = untrained_dit()
    meta.classes = CLASSES
    ae, ae_meta = tiny_autoencoder()
    torch.manual_seed(2)
    noisy = build_noisy_classifier("nc-tiny", LATENT[0], len(CLASSES), channels=8).eval()
    with torch.no_grad():  # its residual blocks start as their shortcuts: perturb so t and x matter
        for p in noisy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    noisy_meta = NoisyClassifierMeta(preset="nc-tiny", model={}, schedule="scaled_linear", num_timesteps=1000,
                                     classes=CLASSES)
    labels = [0, 1, 2, 2, 1]
    sampling = SamplingConfig(steps=4, guidance=0.0, classifier_guidance=3.0)
    guided = generate(dit, meta, ae, ae_meta, labels, sampling, batch_size=5, classifier=(noisy, noisy_meta))
    assert_same_up_to_rounding(guided, generate(dit, meta, ae, ae_meta, labels, sampling, batch_size=2,
                                                classifier=(noisy, noisy_meta)))
    plain = generate(dit, meta, ae, ae_meta, labels, sampling.model_copy(update={"classifier_guidance": 0.0}))
    assert not torch.equal(guided, plain)
    with pytest.raises(ValueError, match="noisy_classifier"):
        generate(dit, meta, ae, ae_meta, labels, sampling)
    with pytest.raises(ValueError, match="equal"):
        generate(dit, meta, ae, ae_meta, labels, sampling, classifier=(noisy, dataclasses.replace(noisy_meta, schedule="linear")))
    # unused guidance leaves the sampling JSON (and so cache keys) as before
    assert "classifier_guidance" not in SamplingConfig().model_dump() and \
        SamplingConfig(classifier_guidance=1.0).model_dump()["classifier_guidance"] == 1.0


@pytest.mark.integration
def test_step_trains_on_the_latents_step_and_writes_what_its_loader_reads(ray_cluster, tmp_path):
    from components.noisy_classifier.load import META, WEIGHTS
    from components.noisy_classifier.train import CHART, run as train_noisy_classifier
    from tests.test_dit import manifest_from, step_ctx, tiny_latent_inputs

    latents = tiny_latent_inputs(tmp_path)["latents"]
    cfg = NoisyClassifierConfig(preset="nc-tiny", t_buckets=2, val_samples=24, train=dict(
        max_steps=4, batch_size=16, log_every=2, checkpoint_every=4))
    ctx = step_ctx(tmp_path, "noisy_classifier")
    out = train_noisy_classifier(cfg, {"latents": latents}, ctx)
    manifest = manifest_from(out, ctx)
    assert {WEIGHTS, META, CHART} <= set(out.files) and manifest.verify() == []
    model, meta = load_noisy_classifier(manifest)
    assert meta.classes == latents.info["classes"] and meta.latent_shape == LATENT and not model.training
    assert meta.model == json.loads(json.dumps(out.info["model"])) and meta.model["in_channels"] == LATENT[0]
    assert {"val_accuracy_t0_499", "val_accuracy_t500_999", "loss", "steps"} <= set(out.metrics)
