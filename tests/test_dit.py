"""The DiT step: its loss in one process, generation (determinism, guidance), weights round trips,
and the step itself on 2 Ray Train workers under ZeRO-2, interrupted and resumed.

Each Ray Train ``fit`` costs ~25 s here; the Ray test checks outputs, loading, the grid, metrics
and resume with one interrupted and one resumed run.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from components.autoencoder.load import AE_META, AE_WEIGHTS
from components.autoencoder.model import build_autoencoder
from components.common.config import StepResources
from components.common.step import FileRecord, Manifest, StepContext
from components.common.storage import Storage
from components.common.tracking import StepTracker
from components.common.train_loop import LocalSession, train_loop
from components.dit.config import DitConfig, SamplingConfig
from components.common.images import class_grid
from components.dit.generate import generate
from components.dit.load import DIT_META, DIT_RAW_WEIGHTS, DIT_WEIGHTS, DitMeta, load_dit
from components.dit.model import build_dit
from components.dit.task import LatentDitTask, grid_labels
from components.dit.train import TASK_CLASSES, build_step_dit
from crash_hooks import crashing
import metas
from rounding import assert_same_up_to_rounding

CLASSES = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")
LATENT = [4, 4, 4]  # c, h, w: an f=2 autoencoder on 8x8 grayscale images


def synthetic_latents(n: int = 192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-scale latents whose mean pattern depends on the class: something to learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    patterns = torch.randn(len(CLASSES), *LATENT, generator=g)
    return patterns[labels] + 0.3 * torch.randn(n, *LATENT, generator=g), labels


def dit_cfg(**overrides) -> DitConfig:
    train = {"max_steps": 40, "batch_size": 32, "lr": 2e-3, "ema_decay": 0.9, "log_every": 10,
             "checkpoint_every": 1000, **overrides.pop("train", {})}
    return DitConfig(preset="DiT-Micro/2", train=train, **overrides)


class RecordingTask(LatentDitTask):
    """Keeps every step's loss (one process, so the list is the test's)."""

    losses: list[float]

    def loss(self, model, batch, step, generator):
        loss, extras = super().loss(model, batch, step, generator)
        self.losses.append(float(loss.detach()))
        return loss, extras


# ---------------------------------------------------------------- training, one process


@pytest.mark.parametrize("learn_sigma,precision", [(False, "fp32"), (True, "fp32"), (True, "bf16")],
                         ids=["eps", "learn_sigma", "learn_sigma-bf16-zero2"])
def test_loss_decreases_in_one_process(tmp_path, learn_sigma, precision):
    # bf16: DeepSpeed casts the parameters, not the buffers (the positional embedding); found on a GPU.
    train = {"precision": precision, "zero_stage": 2} if precision == "bf16" else {}
    cfg = dit_cfg(learn_sigma=learn_sigma, train=train)
    kwargs = build_step_dit(cfg, LATENT, len(CLASSES)).arguments
    assert kwargs["learn_sigma"] is learn_sigma and kwargs["num_classes"] == 3 and kwargs["input_size"] == 4
    task = RecordingTask(cfg, kwargs, {}, in_memory=synthetic_latents())
    task.losses = []
    final = train_loop(task, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 40 and len(task.losses) == 40
    first, last = statistics.mean(task.losses[:8]), statistics.mean(task.losses[-8:])
    assert last < 0.6 * first, (first, last)
    assert ("vlb" in final) is learn_sigma and final["mse"] > 0


def test_model_kwargs_and_grid_labels():
    cfg = dit_cfg(model={"depth": 1, "mlp_ratio": 2.0})
    kwargs = build_step_dit(cfg, [4, 8, 8], 10).arguments
    assert (kwargs["depth"], kwargs["hidden_size"], kwargs["mlp_ratio"], kwargs["input_size"]) == (1, 64, 2.0, 8)
    with pytest.raises(ValueError, match=r"dit.model.in_channels: 3 \(the data gives 4\)"):
        build_step_dit(dit_cfg(model={"in_channels": 3}), [4, 8, 8], 10)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        build_step_dit(DitConfig(preset="DiT-Huge/2"), [4, 8, 8], 10)
    with pytest.raises(ValueError, match="dit.model"):
        build_step_dit(dit_cfg(model={"depht": 3}), [4, 8, 8], 10)
    assert grid_labels(3, 10, 2) == [0, 0, 1, 1, 2, 2]
    assert sorted(set(grid_labels(1000, 4, 1))) == [0, 333, 666, 999]


# ---------------------------------------------------------------- generation


def untrained_dit(learn_sigma=False):
    torch.manual_seed(0)
    dit = build_dit("DiT-Micro/2", input_size=LATENT[1], in_channels=LATENT[0], num_classes=len(CLASSES),
                    learn_sigma=learn_sigma)
    with torch.no_grad():  # adaLN-Zero starts at a zero output: perturb so labels and guidance matter
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = metas.dit_meta(schedule="scaled_linear", num_timesteps=1000, prediction="eps", learn_sigma=learn_sigma,
                    num_classes=len(CLASSES), null_label=dit.null_class_id, latent_shape=LATENT)
    return dit.eval(), meta


def tiny_autoencoder():
    torch.manual_seed(1)
    ae = build_autoencoder("ae-tiny", in_channels=1).eval()
    return ae, metas.ae_meta(latent_shape=LATENT, scale_factor=0.8, image_size=8, channels=1, classes=CLASSES)


@pytest.mark.parametrize("sampling", [
    SamplingConfig(steps=4, guidance=2.0),
    SamplingConfig(steps=4, eta=1.0, thresholding="dynamic"),
    SamplingConfig(sampler="ddpm", steps=4, guidance=1.0),
], ids=["ddim", "ddim-eta1", "ddpm"])
def test_generate_is_deterministic_whatever_the_batch_size(sampling):
    dit, meta = untrained_dit(learn_sigma=sampling.sampler == "ddpm")
    ae, ae_meta = tiny_autoencoder()
    labels = [0, 1, 2, 2, 1, 0, 1]
    images = generate(dit, meta, ae, ae_meta, labels, sampling, batch_size=7)
    assert images.shape == (7, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images, generate(dit, meta, ae, ae_meta, labels, sampling, batch_size=7))
    assert_same_up_to_rounding(images, generate(dit, meta, ae, ae_meta, torch.tensor(labels), sampling, batch_size=3))
    # sample i does not depend on how many come after it
    assert_same_up_to_rounding(images[:2], generate(dit, meta, ae, ae_meta, labels[:2], sampling))
    other_seed = generate(dit, meta, ae, ae_meta, labels, sampling.model_copy(update={"seed": 1}))
    assert not torch.equal(images, other_seed)
    assert not dit.training and not ae.training


def test_guidance_changes_samples_and_labels_are_checked():
    dit, meta = untrained_dit()
    ae, ae_meta = tiny_autoencoder()
    calls = []
    dit.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    labels = [0, 1, 2]
    plain = generate(dit, meta, ae, ae_meta, labels, SamplingConfig(steps=3, guidance=0.0))
    assert calls == [3] * 3  # guidance 0: no unconditional pass
    calls.clear()
    guided = generate(dit, meta, ae, ae_meta, labels, SamplingConfig(steps=3, guidance=3.0))
    assert calls == [6] * 3  # conditional and unconditional halves in one batch
    assert not torch.equal(plain, guided)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        generate(dit, meta, ae, ae_meta, [3], SamplingConfig(steps=2))
    assert generate(dit, meta, ae, ae_meta, [], SamplingConfig(steps=2)).shape == (0, 1, 8, 8)
    grid = class_grid(guided.repeat(2, 1, 1, 1), labels * 2, per_label=3)
    assert grid.size == (3 * 8 + 4 * 2, 3 * 8 + 4 * 2)  # 3 rows (classes) x 3 columns, 2 px padding


def test_export_and_load_round_trip_local_and_s3(tmp_path, s3_bucket):
    cfg = dit_cfg()
    kwargs = build_step_dit(cfg, LATENT, len(CLASSES)).arguments
    meta = metas.dit_meta(model=kwargs, num_classes=3, null_label=3, latent_shape=LATENT, classes=CLASSES)
    task = LatentDitTask(cfg, kwargs, meta.to_json())
    online, ema = task.build_model(), task.build_model()
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.1)
    task.export(online.eval(), ema.eval(), tmp_path)
    remote = Storage.from_uri(f"s3://{s3_bucket}/dit")
    for name in (DIT_WEIGHTS, DIT_RAW_WEIGHTS, DIT_META):
        remote.upload(name, tmp_path / name)
    for source in (str(tmp_path), remote):
        loaded, loaded_meta = load_dit(source)
        assert loaded_meta == DitMeta.from_json(json.loads(json.dumps(meta.to_json()))) and not loaded.training
        for key, value in ema.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        raw, _ = load_dit(source, ema=False)
        for key, value in online.state_dict().items():
            assert torch.equal(raw.state_dict()[key], value), key


# ---------------------------------------------------------------- the step: 2 Ray Train workers, ZeRO-2


def step_ctx(root, step: str, tracker: StepTracker | None = None) -> StepContext:
    return StepContext(step=step, workflow_id="t", cache_key="k", root=Storage.from_uri(str(root)),
                       output=Storage.from_uri(str(root / step)),
                       resources=StepResources(num_workers=2, cpus_per_worker=0.5),
                       tracker=tracker or StepTracker("sqlite:///unused", None))


def manifest_from(out, ctx: StepContext) -> Manifest:
    """What the workflow runner would write for ``out``."""
    files = [FileRecord(p, ctx.output.sha256(p), ctx.output.size(p)) for p in sorted(out.files)]
    return Manifest(step=ctx.step, cache_key="k", code_version="1", location=ctx.output.uri(), config={},
                    upstream={}, files=files, metrics=out.metrics, info=out.info)


def untrained_autoencoder_manifest(root, classes) -> Manifest:
    """An autoencoder step's output without its training (a fit costs ~25 s): fresh ae-tiny
    weights (f=2: 8x8 digits -> 4x4x4 latents) in the step's file format."""
    from safetensors.torch import save_file

    from components.autoencoder.model import AUTOENCODER_PRESETS

    kwargs = {**AUTOENCODER_PRESETS["ae-tiny"], "in_channels": 1}
    torch.manual_seed(0)
    ae = build_autoencoder("ae-tiny", **kwargs).eval()
    out = root / "autoencoder"
    out.mkdir()
    save_file(ae.state_dict(), str(out / AE_WEIGHTS))
    meta = metas.ae_meta(model=kwargs, latent_shape=LATENT, scale_factor=1.0, scale_from="none",
                         classes=classes).to_json()
    (out / AE_META).write_text(json.dumps(meta))
    storage = Storage.from_uri(str(out))
    files = [FileRecord(p, storage.sha256(p), storage.size(p)) for p in (AE_WEIGHTS, AE_META)]
    return Manifest(step="autoencoder", cache_key="k", code_version="1", location=str(out), config={},
                    upstream={}, files=files, info=meta)


def tiny_latent_inputs(tmp_path) -> dict[str, Manifest]:
    """shard (120 MNIST digits at 8 px), an untrained autoencoder and its latents, as manifests."""
    from components.latents.config import LatentsConfig
    from components.latents.run import run as encode_latents
    from components.shard.config import ShardConfig
    from components.shard.run import run as shard

    ctx = step_ctx(tmp_path, "shard")
    shard_manifest = manifest_from(shard(ShardConfig(max_samples=120, image_size=8, samples_per_shard=60,
                                                     val_fraction=0.2), {}, ctx), ctx)
    ae_manifest = untrained_autoencoder_manifest(tmp_path, shard_manifest.info["classes"])
    ctx = step_ctx(tmp_path, "latents")
    latents = manifest_from(encode_latents(LatentsConfig(batch_size=64), {"shard": shard_manifest,
                                                                            "autoencoder": ae_manifest}, ctx), ctx)
    return {"shard": shard_manifest, "autoencoder": ae_manifest, "latents": latents}


def mlflow_tracker(tmp_path) -> StepTracker:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return StepTracker(uri, client.create_run(client.create_experiment("dit-test")).info.run_id)


@pytest.mark.integration
def test_step_on_two_workers_resumes_after_a_crash_and_exports(ray_cluster, tmp_path, monkeypatch):
    from components.common.train_types import TrainingError
    from components.dit.train import run as train_dit

    inputs = tiny_latent_inputs(tmp_path)
    classes = inputs["shard"].info["classes"]

    tracker = mlflow_tracker(tmp_path)
    cfg = dit_cfg(train={"max_steps": 8, "batch_size": 16, "zero_stage": 2, "checkpoint_every": 2, "log_every": 1},
                  sample={"steps": 4, "guidance": 1.5}, grid_per_label=2)
    ctx = step_ctx(tmp_path, "dit", tracker)
    monkeypatch.setitem(TASK_CLASSES, "latents", crashing(LatentDitTask, at_step=5))
    with pytest.raises(TrainingError, match="injected failure at step 5"):
        train_dit(cfg, inputs, ctx)
    assert not ctx.output.exists(DIT_WEIGHTS)
    monkeypatch.setitem(TASK_CLASSES, "latents", LatentDitTask)
    out = train_dit(cfg, inputs, ctx)  # the same ctx.checkpoint_uri: resumes

    logged = [m.step for m in tracker.client.get_metric_history(tracker.run_id, "loss")]
    # Run 1 logged steps 1-5 and checkpointed at 2 and 4; run 2 went on from step 4 (or from 2, if
    # Ray Train had not registered the step-4 checkpoint when the worker failed), not from 0.
    assert sorted(set(logged)) == list(range(1, 9)) and logged.count(1) == 1, logged
    assert len(logged) - 8 in (1, 3) and logged.count(5) == 2, logged
    assert out.metrics["steps"] == 8 and out.metrics["model_flops_per_image"] > 0
    assert out.metrics["images_per_s"] > 0 and out.metrics["loss"] > 0
    assert sorted(out.files) == sorted([DIT_WEIGHTS, DIT_RAW_WEIGHTS, DIT_META, "samples.png"])
    for name in out.files:
        assert ctx.output.exists(name), name
    dit, meta = load_dit(manifest_from(out, ctx))
    assert meta.num_classes == len(classes) == 10 and meta.null_label == 10 and meta.latent_shape == LATENT
    assert meta.model["depth"] == 2 and meta.classes == classes and meta.image_size == 8
    assert out.info["checkpoint_uri"].startswith(ctx.checkpoint_uri)
    raw, _ = load_dit(ctx.output, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(dit.state_dict().values(), raw.state_dict().values()))

    from PIL import Image

    grid = Image.open(ctx.output.path("samples.png"))
    assert grid.size == (2 * 8 + 3 * 2, 10 * 8 + 11 * 2)  # 10 rows (classes) x 2 columns
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.metrics["model_flops_per_image"] == meta.flops_per_image
    artifacts = {a.path for a in tracker.client.list_artifacts(tracker.run_id)}
    assert {"samples.png", DIT_META} <= artifacts
