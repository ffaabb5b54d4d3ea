"""Super-resolution: the U-Net, noise conditioning augmentation, both hand-offs, the composed
sampler, PSNR/SSIM, and the stage's training with resume (one process)."""

from __future__ import annotations

import math

import pytest
import torch

from components.common.train_loop import LocalSession, train_loop
from components.diffusion import NoiseSchedule, q_sample
from components.common.resample import resize
from components.superres.augment import gaussian_blur, max_level, training_conditioning
from components.superres.config import AugmentationConfig, SuperResConfig, SuperResSamplingConfig
from components.superres.load import SuperResMeta
from components.superres.model import EfficientUNet, build_superres
from components.superres.quality import psnr, ssim
from components.superres.sample import SrStage, cascade, check_chain, super_resolve
from components.superres.task import SuperResTask, training_pair
from components.superres.train import build_step_superres
from components.diffusion import sample_generator
from rounding import assert_same_up_to_rounding


pytestmark = pytest.mark.usefixtures("one_thread")


def stage_meta(input_size=8, output_size=16, channels=1, num_classes=0, schedule="cosine", prediction="eps"):
    """The meta of a stage built here (no step wrote it: the model and training entries are nominal)."""
    return SuperResMeta(preset="sr-tiny", model={}, input_size=input_size, output_size=output_size, channels=channels,
                        schedule=schedule, num_timesteps=1000, filter="bicubic", num_classes=num_classes, classes=None,
                        prediction=prediction, sampling={}, augmentation={}, parameters=0, max_steps=0)


class Spy(torch.nn.Module):
    """An 'SR model' that records what it is given and predicts eps = 0.1 * (x_t - upsampled cond)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, t, low_res, noise_cond_aug_level, y=None):
        self.calls.append({"t": t.clone(), "cond": low_res.clone(), "levels": noise_cond_aug_level.clone(), "y": y})
        up = torch.nn.functional.interpolate(low_res, size=x.shape[-2:], mode="nearest")
        return 0.1 * self.weight * (x - up)


def generators(n, seed=0, stream=1):
    return [sample_generator(seed, i, stream) for i in range(n)]


# ---------------------------------------------------------------- the model


def test_efficient_unet_shapes_conditioning_and_presets():
    torch.manual_seed(0)
    model = build_superres("sr-tiny", in_channels=3, out_size=16, num_classes=4)
    x, low = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)
    t, s = torch.tensor([5, 500]), torch.tensor([0, 100])
    assert model(x, t, low, s).shape == (2, 3, 16, 16)
    # zero-initialised output: the untrained model predicts 0; after a perturbation it depends on
    # the conditioning image, the level s and the label
    assert model(x, t, low, s).abs().max() == 0
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    base = model(x, t, low, s, torch.tensor([0, 1]))
    assert not torch.allclose(base, model(x, t, low + 0.5, s, torch.tensor([0, 1])))
    assert not torch.allclose(base, model(x, t, low, s + 200, torch.tensor([0, 1])))
    assert not torch.allclose(base, model(x, t, low, s, torch.tensor([2, 3])))
    with pytest.raises(ValueError, match="divisible"):
        EfficientUNet(out_size=18, channel_mults=(1, 2, 4), blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="unknown super-resolution preset"):
        build_superres("sr-huge")


# ---------------------------------------------------------------- augmentation


def test_training_augmentation_levels_and_blur():
    schedule = NoiseSchedule.from_name("cosine", 1000)
    low = torch.rand(256, 1, 8, 8) * 2 - 1
    aug = AugmentationConfig(noise={"enabled": True, "max_level": 0.3})
    cond, levels = training_conditioning(low, schedule, aug, torch.Generator().manual_seed(0))
    assert levels.min() == 0 and levels.max() <= max_level(schedule, 0.3) == 300 and levels.float().std() > 50
    # each example is q(z_s | z) at its own level: the residual's variance follows 1 - abar_s
    big = levels > 150
    residual = cond[big] - schedule.alphas_cumprod[levels[big]].sqrt()[:, None, None, None] * low[big]
    expected = (1 - schedule.alphas_cumprod[levels[big]]).mean()
    assert abs(float(residual.pow(2).mean()) - float(expected)) < 0.1 * float(expected)
    assert torch.equal(cond[levels == 0], low[levels == 0])
    # the same generator state gives the same augmentation; noise off gives levels 0 and z itself
    again, _ = training_conditioning(low, schedule, aug, torch.Generator().manual_seed(0))
    assert torch.equal(cond, again)
    off, zero = training_conditioning(low, schedule, AugmentationConfig(noise={"enabled": False}),
                                      torch.Generator().manual_seed(0))
    assert torch.equal(off, low) and not zero.any()
    # blur: applied with the configured probability, sigma 0 is the identity, it smooths
    blurred, _ = training_conditioning(low, schedule, AugmentationConfig(
        noise={"enabled": False}, blur={"enabled": True, "probability": 0.5, "kernel_size": 3}),
        torch.Generator().manual_seed(1))
    changed = (blurred - low).flatten(1).abs().amax(1) > 1e-6
    assert 0.3 < changed.float().mean() < 0.7
    assert blurred[changed].var() < low[changed].var()
    assert torch.allclose(gaussian_blur(low[:4], torch.zeros(4), 5), low[:4])


def test_sampling_uses_the_fixed_level_and_draws_only_from_the_sample_streams():
    schedule = NoiseSchedule.from_name("cosine", 1000)
    stage = SrStage(Spy(), stage_meta(), SuperResSamplingConfig(steps=4, noise_cond_aug_level=0.2))
    low = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.manual_seed(123)  # the global RNG must play no part
    first = super_resolve(stage, low, generators(3))
    calls = stage.model.calls
    assert len(calls) == 4 and all(torch.equal(c["levels"], torch.full((3,), 200)) for c in calls)
    # non-truncated hand-off: the conditioning is q(z_s | z) at s = 200, the same at every step
    noise = torch.stack([torch.randn((1, 8, 8), generator=g) for g in generators(3)])
    assert torch.allclose(calls[0]["cond"], q_sample(schedule, low, torch.full((3,), 200), noise), atol=1e-6)
    assert all(torch.equal(c["cond"], calls[0]["cond"]) for c in calls)
    torch.manual_seed(999)
    stage.model.calls = []
    assert torch.equal(first, super_resolve(stage, low, generators(3)))
    assert first.shape == (3, 1, 16, 16) and first.abs().max() <= 1
    assert not torch.equal(first, super_resolve(stage, low, generators(3, seed=1)))


# ---------------------------------------------------------------- classifier-free guidance


class LabelsBound(torch.nn.Module):
    """A class-conditional model with its labels fixed: sampled as an unconditional stage (num_classes 0),
    it is the conditional model on the plain path, without the guidance wrapper."""

    def __init__(self, model, labels):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, x, t, low_res, noise_cond_aug_level, y=None):
        return self.model(x, t, low_res, noise_cond_aug_level, self.labels)


def class_conditional_stage(guidance, num_classes=3, steps=3, prediction="eps", weight_noise=0.05):
    """A tiny class-conditional SR stage with random weights (the same for every guidance weight)."""
    torch.manual_seed(0)
    model = build_superres("sr-tiny", in_channels=1, out_size=16, num_classes=num_classes).eval()
    for p in model.parameters():
        p.data.add_(weight_noise * torch.randn_like(p))
    meta = stage_meta(num_classes=num_classes, prediction=prediction)
    sampling = SuperResSamplingConfig(steps=steps, guidance=guidance, thresholding="none")
    return SrStage(model, meta, sampling)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_class_conditional_stage_samples_with_guidance(batch):
    low, labels = torch.rand(batch, 1, 8, 8) * 2 - 1, torch.arange(batch) % 3
    unguided = class_conditional_stage(0.0)
    plain = SrStage(LabelsBound(unguided.model, labels), stage_meta(num_classes=0), unguided.sampling)
    at_zero = super_resolve(unguided, low, generators(batch), labels=labels)
    torch.testing.assert_close(at_zero, super_resolve(plain, low, generators(batch)))
    guided = super_resolve(class_conditional_stage(2.0), low, generators(batch), labels=labels)
    assert guided.shape == (batch, 1, 16, 16) and torch.isfinite(guided).all()
    assert not torch.allclose(guided, at_zero)


def test_guidance_doubles_every_condition_and_combines_the_two_halves():
    spy, low, labels = Spy(), torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([0, 2])
    super_resolve(SrStage(spy, stage_meta(num_classes=3), SuperResSamplingConfig(steps=2, guidance=1.5)),
                  low, generators(2), labels=labels)
    for call in spy.calls:  # one batch of 2N rows: the conditional half, then the null-label half
        assert torch.equal(call["y"], torch.tensor([0, 2, 3, 3]))
        assert torch.equal(call["cond"][:2], call["cond"][2:]) and torch.equal(call["levels"], torch.full((4,), 100))
    # one deterministic DDIM step of an x0-model returns x̂_0 itself, so the guided sample is
    # (1 + w)·conditional − w·unconditional (Ho & Salimans 2022, eq. 6) of the two unguided samples
    w, null = 2.0, torch.full_like(labels, 3)
    one_step = {"steps": 1, "prediction": "x0", "weight_noise": 0.02}  # small outputs: nothing clamped
    conditional = super_resolve(class_conditional_stage(0.0, **one_step), low, generators(2), labels=labels)
    unconditional = super_resolve(class_conditional_stage(0.0, **one_step), low, generators(2), labels=null)
    guided = super_resolve(class_conditional_stage(w, **one_step), low, generators(2), labels=labels)
    assert max(conditional.abs().max(), unconditional.abs().max()) < 1  # neither was clamped
    expected = ((1 + w) * conditional - w * unconditional).clamp(-1, 1)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- hand-offs and the cascade


def three_stage_chain(handoff_2="truncated"):
    stages = [SrStage(Spy(), stage_meta(8, 16), SuperResSamplingConfig(steps=5, noise_cond_aug_level=0.1)),
              SrStage(Spy(), stage_meta(16, 32),
                      SuperResSamplingConfig(steps=5, noise_cond_aug_level=0.25, handoff=handoff_2))]
    return stages


def test_truncated_handoff_stops_the_stage_below_and_passes_x_s():
    stages = three_stage_chain("truncated")
    base = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    out = cascade(base, stages, [0, 1], seed=0)
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.uint8
    level = max_level(stages[1].schedule, 0.25)
    below, above = stages[0].model.calls, stages[1].model.calls
    assert all(int(c["t"][0]) > level for c in below)  # stopped above s, not run to 0
    assert all(torch.equal(c["levels"], torch.full((2,), level)) for c in above)
    # what the upper stage is conditioned on is the lower stage's x_s itself (no extra noise)
    expected = super_resolve(stages[0], base.float() / 127.5 - 1, generators(2, 0, 1), stop_at=level)
    assert torch.allclose(above[0]["cond"], expected, atol=1e-6)
    assert expected.abs().max() > 1 or expected.std() > 0  # unclamped x_s, not an image in [-1, 1]


def test_non_truncated_handoff_runs_to_zero_then_noises_to_the_level():
    stages = three_stage_chain("non_truncated")
    base = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    cascade(base, stages, [0, 1], seed=0)
    below, above = stages[0].model.calls, stages[1].model.calls
    assert len(below) == 5 and int(below[-1]["t"][0]) < 250
    finished = super_resolve(stages[0], base.float() / 127.5 - 1, generators(2, 0, 1))
    noise = torch.stack([torch.randn((1, 16, 16), generator=g) for g in generators(2, 0, 2)])
    level = max_level(stages[1].schedule, 0.25)
    expected = q_sample(stages[1].schedule, finished, torch.full((2,), level), noise)
    assert torch.allclose(above[0]["cond"], expected, atol=1e-6)
    assert all(torch.equal(c["levels"], torch.full((2,), level)) for c in above)


def test_cascade_is_deterministic_whatever_the_batch_size_and_checks_the_chain():
    torch.manual_seed(0)
    real = [SrStage(build_superres("sr-tiny", in_channels=1, out_size=16).eval(), stage_meta(8, 16),
                    SuperResSamplingConfig(steps=3, sampler="ddpm")),
            SrStage(build_superres("sr-tiny", in_channels=1, out_size=32).eval(), stage_meta(16, 32),
                    SuperResSamplingConfig(steps=3, handoff="truncated"))]
    for stage in real:
        for p in stage.model.parameters():
            p.data.add_(0.02 * torch.randn_like(p))
    base = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    whole = cascade(base, real, [0, 1, 2, 3, 4], seed=7, batch_size=5)
    split = cascade(base, real, [0, 1, 2, 3, 4], seed=7, batch_size=2)
    assert whole.shape == (5, 1, 32, 32)
    assert_same_up_to_rounding(whole, split)
    assert not torch.equal(whole, cascade(base, real, [0, 1, 2, 3, 4], seed=8, batch_size=5))
    with pytest.raises(ValueError, match="takes 16 px, but the stage below gives 8"):
        check_chain(8, real[1:])
    first_truncated = [SrStage(Spy(), stage_meta(8, 16), SuperResSamplingConfig(handoff="truncated"))]
    with pytest.raises(ValueError, match="latent space"):
        check_chain(8, first_truncated)
    mixed = [real[0], SrStage(Spy(), stage_meta(16, 32, schedule="linear"), SuperResSamplingConfig(handoff="truncated"))]
    with pytest.raises(ValueError, match="same noise schedule"):
        check_chain(8, mixed)


# ---------------------------------------------------------------- quality metrics


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    assert torch.isinf(psnr(truth, truth)).all()
    assert torch.allclose(ssim(truth, truth), torch.ones(4))
    shifted = (truth + 0.2).clamp(-1, 1)
    mse01 = ((shifted - truth) / 2).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(shifted, truth), -10 * torch.log10(mse01))
    noisy = truth + 0.3 * torch.randn(truth.shape, generator=g)
    noisier = truth + 0.6 * torch.randn(truth.shape, generator=g)
    assert (ssim(noisy, truth) > ssim(noisier, truth)).all() and (ssim(noisy, truth) < 1).all()


def test_training_pairs_follow_the_filter():
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    cfg = SuperResConfig(input_size=8, output_size=16)
    high, low = training_pair(images, cfg)
    assert high.shape == (2, 1, 16, 16) and low.shape == (2, 1, 8, 8)
    assert torch.allclose(low, resize(high, 8, "bicubic"))
    with pytest.raises(ValueError, match="larger than input_size"):
        SuperResConfig(input_size=16, output_size=16)


# ---------------------------------------------------------------- training, one process


class FailingTask(SuperResTask):
    fail_at: int | None = None
    losses: list

    def loss(self, model, batch, step, generator):
        if self.fail_at is not None and step >= self.fail_at:
            raise RuntimeError(f"injected failure at step {step}")
        loss, extras = super().loss(model, batch, step, generator)
        self.losses.append((step, float(loss.detach())))
        return loss, extras


def smooth_digits(n=96, size=16):
    """Blobs whose high-resolution detail is predictable from the low-resolution image."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), torch.arange(n) % 3


def test_stage_trains_and_resumes_after_a_crash(tmp_path):
    cfg = SuperResConfig(input_size=8, output_size=16, preset="sr-tiny", class_conditional=True,
                         augmentation={"noise": {"max_level": 0.5}, "blur": {"enabled": True}},
                         train=dict(max_steps=30, batch_size=16, lr=2e-3, ema_decay=0.9, log_every=10,
                                    checkpoint_every=10))
    kwargs = build_step_superres(cfg, channels=1, num_classes=3).arguments
    data = smooth_digits()
    crashing = FailingTask(cfg, kwargs, {"num_classes": 3}, in_memory=data)
    crashing.fail_at, crashing.losses = 25, []
    with pytest.raises(RuntimeError, match="injected failure at step 25"):
        train_loop(crashing, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    resumed = FailingTask(cfg, kwargs, {"num_classes": 3}, in_memory=data)
    resumed.losses = []
    final = train_loop(resumed, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 30 and [s for s, _ in resumed.losses] == list(range(20, 30))  # lost < one interval
    reference = FailingTask(cfg, kwargs, {"num_classes": 3}, in_memory=data)
    reference.losses = []
    train_loop(reference, cfg.train, LocalSession(tmp_path / "reference"), None)
    assert dict(reference.losses)[29] == pytest.approx(dict(resumed.losses)[29], rel=1e-5)
    first, last = (sum(v for _, v in reference.losses[i:i + 8]) / 8 for i in (0, 22))
    assert last < first and math.isfinite(last)
    assert 0 < final["aug_level_mean"] < 500


# ---------------------------------------------------------------- the pipeline's cascade config


def test_pipeline_config_checks_the_chain_and_the_base_resolution():
    from pipelines.config import PipelineConfig
    from pipelines.latent_diffusion import build_workflow

    def config(autoencoder=None, stages=()):
        return {"name": "c", "shard": {"image_size": 64}, "autoencoder": autoencoder, "superres": list(stages)}

    two = [{"input_size": 32, "output_size": 48}, {"input_size": 48, "output_size": 64,
                                                   "sample": {"handoff": "truncated"}}]
    cfg = PipelineConfig(**config({"image_size": 32}, two))
    workflow = build_workflow(cfg)
    assert [(s.name, s.inputs) for s in workflow.steps] == [
        ("shard", ()), ("superres_1", ("shard",)), ("superres_2", ("shard",)), ("autoencoder", ("shard",))]
    with pytest.raises(ValueError, match="superres.0.input_size is 32, but the stage below gives 64"):
        PipelineConfig(**config(None, two))  # no base resolution: the shard's 64 px
    with pytest.raises(ValueError, match="superres.1.input_size is 40"):
        PipelineConfig(**config({"image_size": 32}, [two[0], {**two[1], "input_size": 40}]))
    with pytest.raises(ValueError, match="latent space"):
        PipelineConfig(**config({"image_size": 32}, [{**two[0], "sample": {"handoff": "truncated"}}]))


def test_reading_shards_at_a_base_resolution(tmp_path):
    import numpy as np

    from components.common.resample import resize_uint8

    images = np.random.default_rng(0).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    smaller = resize_uint8(images, 16)
    assert smaller.shape == (3, 1, 16, 16) and smaller.dtype == np.uint8
    # a box-blurred 2x downsample stays close to the mean of each 2x2 block
    blocks = images.reshape(3, 1, 16, 2, 16, 2).astype(float).mean(axis=(3, 5))
    assert np.abs(resize_uint8(images, 16, "area").astype(float) - blocks).max() <= 1
    assert resize_uint8(images, 32) is images


def test_stage_trains_under_bf16_and_zero2(tmp_path):
    """DeepSpeed casts the parameters, not what the model computes from t and s."""
    cfg = SuperResConfig(input_size=8, output_size=16, preset="sr-tiny",
                         train=dict(max_steps=3, batch_size=8, precision="bf16", zero_stage=2, log_every=1,
                                    checkpoint_every=100, ema_decay=0.5))
    task = SuperResTask(cfg, build_step_superres(cfg, channels=1, num_classes=0).arguments, {"num_classes": 0},
                        in_memory=smooth_digits(32))
    final = train_loop(task, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 3 and math.isfinite(final["loss"])

