"""The ControlNet stage: the controlled DiT equals the frozen one at initialisation (bit for bit, with
and without guidance, every sampler), gradients reach only the branch, control scale 0 is the DiT's
own sample, wrong control shapes are refused, the edge signal, and the training task resumes after a
crash in one process.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from components.autoencoder.model import AUTOENCODER_PRESETS, build_autoencoder
from components.common.train_loop import LocalSession, train_loop
from components.controlnet.config import ControlNetConfig
from components.controlnet.model import ControlledDiT
from components.controlnet.sample import check_control_images, generate_controlled
from components.controlnet.signals import ControlMaker, blurred, edge_map, low_resolution, sobel_magnitude
from components.controlnet.task import ControlNetTask
from components.diffusion.registry import SAMPLERS
from components.dit.config import SamplingConfig
from components.dit.generate import generate
from components.dit.model import build_dit
import metas
from crash_hooks import CrashAtStep

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = (4, 4, 4)  # an f=2 autoencoder on 8x8 grey images
DIT_META = {"schedule": "scaled_linear", "num_timesteps": 100, "prediction": "eps", "learn_sigma": False,
            "classes": None, "num_classes": 3, "null_label": 3, "latent_shape": list(LATENT), "image_channels": 1, "image_size": 8}


def trained_looking_dit(depth: int = 3, seed: int = 0, **overrides):
    """A DiT whose weights are random everywhere: a fresh one's adaLN-Zero blocks are identities and its
    output is zero, which would make 'equal to the DiT' trivially true."""
    torch.manual_seed(seed)
    dit = build_dit("DiT-Micro/2", input_size=4, in_channels=4, num_classes=3, depth=depth, learn_sigma=False,
                    **overrides)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    return dit.eval()


def tiny_autoencoder():
    torch.manual_seed(1)
    return build_autoencoder("ae-tiny", **{**AUTOENCODER_PRESETS["ae-tiny"], "in_channels": 1}).eval(), \
        metas.ae_meta(scale_factor=1.0, channels=1, image_size=8, latent_shape=list(LATENT))


def perturb_branch(model: ControlledDiT) -> None:
    """The zero layers moved off zero, as training moves them."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_controlled_dit_equals_the_frozen_dit_at_initialisation(num_blocks):
    dit = trained_looking_dit(depth=3)
    model = ControlledDiT(copy.deepcopy(dit), num_blocks).eval()
    g = torch.Generator().manual_seed(0)
    x, control = torch.randn(5, *LATENT, generator=g), torch.randn(5, *LATENT, generator=g)
    t, y = torch.tensor([0, 10, 50, 90, 99]), torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        base, controlled = dit(x, t, y), model(x, t, y, control=control)
    assert base.abs().max() > 0.1  # a real output, not adaLN-Zero's zeros
    assert torch.equal(base, controlled)
    perturb_branch(model)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y, control=control), base)
        assert torch.equal(model(x, t, y, control=control, control_scale=0), base)


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_samples_at_initialisation_are_the_dits_with_and_without_guidance(guidance):
    dit, (ae, ae_meta) = trained_looking_dit(depth=3), tiny_autoencoder()
    model = ControlledDiT(copy.deepcopy(dit), 2)
    controls = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    sampling = SamplingConfig(steps=4, guidance=guidance)
    labels = [0, 1, 2, 1]
    base = generate(dit, DIT_META, ae, ae_meta, labels, sampling)
    assert torch.equal(generate_controlled(model, DIT_META, ae, ae_meta, labels, controls, sampling), base)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_control_scale_zero_gives_the_dits_samples_with_every_sampler(sampler):
    """Through ``run_sampler`` itself, the control latent in ``extra_args`` beside the labels, guided
    (guidance doubles the control with the batch, so both branches get the residuals)."""
    from components.diffusion import NoiseSchedule, per_sample_noise, run_sampler, sample_generator
    from components.dit.generate import dit_denoiser

    dit = trained_looking_dit(depth=2)
    model = ControlledDiT(copy.deepcopy(dit), 2)
    perturb_branch(model)
    schedule = NoiseSchedule.from_name("scaled_linear", 100)
    sampling = SamplingConfig(steps=3, guidance=2.0)
    options = {"ddim": {"eta": 0.5}, "langevin": {"langevin_steps": 1}}.get(sampler, {})
    control = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(3))

    def draw(network, scale=None, **extra):
        if scale is not None:
            network.control_scale = scale
        generators = [sample_generator(0, i) for i in range(3)]
        x = torch.stack([torch.randn(LATENT, generator=g) for g in generators])
        with torch.no_grad():
            return run_sampler(sampler, dit_denoiser(network, DIT_META, sampling, schedule), x,
                               torch.tensor([90, 50, 10]), schedule, noise=per_sample_noise(generators),
                               extra_args={"y": torch.tensor([0, 1, 2]), **extra}, **options)

    base = draw(dit)
    assert torch.equal(draw(model, 0.0, control=control), base)
    assert not torch.allclose(draw(model, 1.0, control=control), base)


def test_only_the_branch_gets_gradients_and_an_optimizer_step_leaves_the_dit_bit_identical():
    dit = trained_looking_dit(depth=3)
    model = ControlledDiT(dit, 2).train()
    frozen = {k: v.clone() for k, v in dit.state_dict().items()}
    assert set(model.state_dict()) == {k for k, _ in model.controlnet.named_parameters(prefix="controlnet")}
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dit.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the zero layers get gradients at once; the rest of the branch from the second step
        x, control = torch.randn(4, *LATENT, generator=g), torch.randn(4, *LATENT, generator=g)
        out = model(x, torch.tensor([1, 20, 40, 60]), torch.tensor([0, 1, 2, 0]), control=control)
        out.pow(2).mean().backward()
        optimizer.step()
    assert all(p.grad is None for p in dit.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.controlnet.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in dit.state_dict().items())
    assert not dit.training  # train() on the controlled model leaves the frozen DiT in eval mode


def test_a_text_dit_and_too_many_blocks_are_refused():
    from components.dit.text_model import TextDiT

    with pytest.raises(ValueError, match="class-conditional DiT.*TextDiT"):
        ControlledDiT(TextDiT(trained_looking_dit(), torch.nn.Identity()), 1)
    with pytest.raises(ValueError, match="num_blocks is 4; the DiT has 3 blocks"):
        ControlledDiT(trained_looking_dit(depth=3), 4)


def test_a_control_of_the_wrong_shape_is_refused_naming_the_expected_one():
    model = ControlledDiT(trained_looking_dit(), 1)
    with pytest.raises(ValueError, match=r"edges.png: is 3x8x8 .* takes 1x8x8 control images"):
        check_control_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), DIT_META, ["edges.png"])
    with pytest.raises(ValueError, match=r"control image 0: is 1x16x16"):
        check_control_images(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), DIT_META)
    with pytest.raises(ValueError, match=r"control latent has shape \(4, 2, 2\); this DiT takes \(4, 4, 4\)"):
        model(torch.zeros(1, *LATENT), torch.tensor([1]), torch.tensor([0]), control=torch.zeros(1, 4, 2, 2))


def test_edge_signal_outlines_a_square_and_the_other_signals_keep_the_shape():
    images = torch.zeros(2, 1, 12, 12, dtype=torch.uint8)
    images[:, :, 3:9, 3:9] = 255
    magnitude = sobel_magnitude(images)
    assert magnitude.max() <= 2 ** 0.5 and magnitude[0, 0, 6, 6] == 0 and magnitude[0, 0, 0, 0] == 0
    edges = edge_map(images, threshold=0.25)
    assert edges.dtype == torch.uint8 and edges.shape == images.shape
    inside, outside = edges[0, 0, 5:7, 5:7], edges[0, 0, 0, :]
    assert (inside == 0).all() and (outside == 0).all()
    assert (edges[0, 0, 3, 3:9] == 255).all() and (edges[0, 0, 2, 4:8] == 255).all()  # both sides of the step
    assert edge_map(images, threshold=1.5).max() == 0  # above the largest magnitude: nothing
    rgb = images.expand(-1, 3, -1, -1)
    assert torch.equal(edge_map(rgb, 0.25), edges.expand(-1, 3, -1, -1))
    for signal in (blurred(images, 2.0), low_resolution(images, 4)):
        assert signal.shape == images.shape and signal.dtype == torch.uint8
        assert 0 < int(signal[0, 0, 2, 2]) < 255  # the square's edge spread out
    batch = ControlMaker(ControlNetConfig(control="blur"))({"image": images, "label": torch.tensor([0, 1])})
    assert batch["control"].min() >= -1 and batch["image"].max() == 1 and batch["control"].dtype == torch.float32


def test_config_needs_a_folder_exactly_for_folder_controls():
    with pytest.raises(ValueError, match="control: folder needs controlnet.folder"):
        ControlNetConfig(control="folder")
    with pytest.raises(ValueError, match="controlnet.folder is for control: folder"):
        ControlNetConfig(control="edges", folder="/x")
    with pytest.raises(ValueError, match="control"):
        ControlNetConfig(control="depth")


# ---------------------------------------------------------------- the task in one process


class RecordingTask(ControlNetTask):
    losses: list

    def loss(self, model, batch, step, generator):
        loss, extras = super().loss(model, batch, step, generator)
        self.losses.append((step, float(loss.detach())))
        return loss, extras


class CrashingTask(CrashAtStep, RecordingTask):  # crash_hooks' mixin raises from crash_at_step on
    pass


def digits(n=64):
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    for i in range(n):  # a bright box at a random place: the edges say where
        r, c = torch.randint(0, 4, (2,), generator=g).tolist()
        images[i, :, r:r + 4, c:c + 4] = 255
    return images, torch.arange(n) % 3


def task_of(cfg, dit, ae, data):
    task = CrashingTask(cfg, DIT_META, in_memory=data)
    task.set_models(dit=dit, ae=ae)
    task.losses = []
    return task


def test_task_trains_only_the_branch_and_resumes_after_a_crash(tmp_path):
    cfg = ControlNetConfig(num_blocks=2, grid_controls=2, grid_per_control=2, sample={"steps": 2},
                           train=dict(max_steps=12, batch_size=16, lr=1e-3, ema_decay=0.9, log_every=4,
                                      checkpoint_every=4))
    dit, ae, data = trained_looking_dit(depth=3), tiny_autoencoder(), digits()
    frozen = {k: v.clone() for k, v in dit.state_dict().items()}
    crashing = task_of(cfg, dit, ae, data)
    crashing.crash_at_step = 10
    with pytest.raises(RuntimeError, match="injected failure at step 10"):
        train_loop(crashing, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    resumed = task_of(cfg, dit, ae, data)
    final = train_loop(resumed, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 12 and [s for s, _ in resumed.losses] == [8, 9, 10, 11]  # from the step-8 checkpoint
    reference = task_of(cfg, dit, ae, data)
    train_loop(reference, cfg.train, LocalSession(tmp_path / "reference"), None)
    assert dict(reference.losses)[11] == pytest.approx(dict(resumed.losses)[11], rel=1e-5)
    assert all(torch.equal(v, frozen[k]) for k, v in dit.state_dict().items())  # the task's DiT never moved
    export = sorted((tmp_path / "ckpt").rglob("export/controlnet.safetensors"))[-1]
    from safetensors.torch import load_file

    weights = load_file(str(export))
    assert weights and all(k.startswith("controlnet.") for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "zero_linears" in k)  # moved off zero
    assert json.loads((export.parent / "controlnet.json").read_text())["num_classes"] == 3
    name, grid = reference.preview(_ema_of(reference, export.parent))
    assert name == "samples" and grid.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # control + 2 samples, 2 rows


def _ema_of(task, export_dir):
    from safetensors.torch import load_file

    from components.common.ema import EMA

    model = task.build_model()
    model.load_state_dict(load_file(str(export_dir / "controlnet.safetensors")))
    return EMA(model, 0.9)


def test_the_pipeline_takes_a_controlnet_section_after_the_dit_and_refuses_it_without_one():
    from components.common.config import ConfigError
    from conftest import REPO
    from pipelines.config import load_pipeline_config
    from pipelines.latent_diffusion import build_workflow

    preset = REPO / "configs" / "pipeline" / "mnist-controlnet.yaml"
    steps = {s.name: s for s in build_workflow(load_pipeline_config(preset)).steps}
    assert steps["controlnet"].inputs == ("shard", "autoencoder", "dit") and "controlnet" in steps["evaluate"].inputs
    assert steps["controlnet"].config.control == "edges"
    with pytest.raises(ConfigError, match=r"section 'controlnet' needs section\(s\) \['dit'\]"):
        load_pipeline_config(preset, ["dit=null", "distill=null"])
    with pytest.raises(ConfigError, match="dit.conditioning: text: controlnet sample"):
        load_pipeline_config(REPO / "configs" / "pipeline" / "mnist-text.yaml",
                             ["controlnet.control=edges"])


def test_task_trains_under_bf16_and_zero2_with_the_frozen_dit_cast_alongside(tmp_path):
    """DeepSpeed casts the module with ``.bfloat16()``: the DiT held outside the module tree must follow."""
    cfg = ControlNetConfig(num_blocks=1, train=dict(max_steps=4, batch_size=16, lr=1e-3, ema_decay=0.9, log_every=2,
                                                    checkpoint_every=100, precision="bf16", zero_stage=2))
    task = task_of(cfg, trained_looking_dit(depth=2), tiny_autoencoder(), digits(32))
    final = train_loop(task, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 4 and all(torch.isfinite(torch.tensor(loss)) for _, loss in task.losses)
    model = task.build_model().bfloat16()
    assert {p.dtype for p in model.dit.parameters()} == {torch.bfloat16}


def test_the_controlnet_preset_shares_every_other_step_with_the_demo():
    """mnist-controlnet.yaml promises that after `make demo` only its controlnet step (and evaluate,
    which scores it) run: every other step must have the demo's cache key, so a change of mnist.yaml
    has to be made in both."""
    from test_shape import step_cache_keys

    demo, controlled = step_cache_keys("mnist"), step_cache_keys("mnist-controlnet")
    assert set(controlled) == set(demo) | {"controlnet"}
    assert {name: controlled[name] for name in demo if name != "evaluate"} == \
           {name: key for name, key in demo.items() if name != "evaluate"}
