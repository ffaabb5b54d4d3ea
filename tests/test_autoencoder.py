"""The autoencoder step: loss and gradient separation (no Ray), and one real training run through
``run`` (2 Ray Train workers, ZeRO 1) whose result the latents tests reuse.

A Ray Train ``fit`` costs ~25 s here (~75 s in a fresh Ray), so there is exactly one, shared with
tests/test_latents.py through ``_CACHE`` (this module is imported once per session).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from components.autoencoder.config import AutoencoderConfig
from components.autoencoder.load import AE_META, AE_WEIGHTS, decode_scaled, encode_scaled, load_autoencoder
from components.autoencoder.lpips import LPIPS, load_lpips
from components.autoencoder.model import AutoencoderKL
from components.autoencoder.task import AutoencoderTask, AutoencoderTrainModule, autoencoder_losses
from components.autoencoder.train import (
    RECONSTRUCTIONS,
    build_step_autoencoder,
    reconstruction_metrics,
    run,
)
from components.common.config import StepResources
from components.common.shard_reader import read_image_shards
from components.common.step import FileRecord, Manifest, StepContext, StepOutput
from components.common.storage import Storage
from components.common.tracking import StepTracker
from components.common.train_types import TrainConfig

_CACHE: dict[str, object] = {}
TINY = dict(preset="ae-tiny", model={"in_channels": 1})
INFO = {"channels": 1, "image_size": 32}


def make_ctx(root: Path, step: str, tracker: StepTracker | None = None, workers: int = 2) -> StepContext:
    root = Path(root)
    return StepContext(step=step, workflow_id="t", cache_key="k", root=Storage.from_uri(str(root)),
                       output=Storage.from_uri(str(root / step)),
                       resources=StepResources(num_workers=workers, cpus_per_worker=0.5),
                       tracker=tracker or StepTracker("sqlite:///unused", None))


def manifest_from(out: StepOutput, ctx: StepContext) -> Manifest:
    """What the workflow runner would write for ``out``."""
    files = [FileRecord(p, ctx.output.sha256(p), ctx.output.size(p)) for p in sorted(out.files)]
    return Manifest(step=ctx.step, cache_key="k", code_version="1", location=ctx.output.uri(), config={},
                    upstream={}, files=files, metrics=out.metrics, info=out.info)


def sqlite_tracker(path: Path) -> StepTracker:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return StepTracker(uri, client.create_run(client.create_experiment("ae-test")).info.run_id)


def digits(n: int = 64) -> torch.Tensor:
    """The first bundled digits, padded to 32x32, uint8 (n, 1, 32, 32): data without Ray."""
    from components.shard.sources import mnist_arrays

    pixels, _ = mnist_arrays()
    return torch.from_numpy(np.pad(pixels[:n], ((0, 0), (2, 2), (2, 2)))[:, None].copy())


@pytest.fixture(scope="module")
def shard_manifest(ray_cluster, tmp_path_factory) -> Manifest:
    if "shard" not in _CACHE:
        from components.shard.config import ShardConfig
        from components.shard.run import run as shard

        ctx = make_ctx(tmp_path_factory.mktemp("pipeline"), "shard")
        cfg = ShardConfig(source="builtin:mnist", max_samples=300, samples_per_shard=100, val_fraction=0.1)
        _CACHE["shard"] = manifest_from(shard(cfg, {}, ctx), ctx)
    return _CACHE["shard"]


@pytest.fixture(scope="module")
def trained(shard_manifest, tmp_path_factory) -> tuple[Manifest, StepTracker]:
    """The autoencoder step, run once: ae-tiny on 1 channel, 30 steps, 2 workers, ZeRO 1."""
    if "ae" not in _CACHE:
        root = tmp_path_factory.mktemp("ae")
        tracker = sqlite_tracker(root)
        ctx = make_ctx(root, "autoencoder", tracker)
        cfg = AutoencoderConfig(**TINY, scale_estimate_samples=128, val_samples=16,
                                train=TrainConfig(max_steps=30, batch_size=16, lr=2e-3, zero_stage=1,
                                                  log_every=5, ema_decay=0.8))
        _CACHE["ae"] = (manifest_from(run(cfg, {"shard": shard_manifest}, ctx), ctx), tracker)
    return _CACHE["ae"]


# ---------------------------------------------------------------- no Ray


def tiny_module(disc_start: int | None = 0, seed: int = 0) -> tuple[AutoencoderTrainModule, AutoencoderConfig]:
    cfg = AutoencoderConfig(**TINY, disc_start=disc_start, disc_channels=8, disc_layers=2)
    torch.manual_seed(seed)
    return AutoencoderTrainModule(build_step_autoencoder(cfg, INFO).arguments, cfg), cfg


def grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]


def test_one_backward_trains_each_network_on_its_own_objective():
    """The summed loss gives the discriminator exactly the hinge gradient and the autoencoder
    exactly the gradient of rec + KL + w·g: the generator term does not touch the critic, the
    hinge term does not touch the autoencoder."""
    from components.autoencoder.discriminator import hinge_d_loss

    module, cfg = tiny_module()
    images = digits(8).float() / 127.5 - 1
    seed = 123
    total, metrics = autoencoder_losses(module, images, 0, cfg, torch.Generator().manual_seed(seed))
    assert {"rec_loss", "kl", "g_loss", "d_loss", "d_weight"} <= set(metrics)
    disc_params, ae_params = list(module.disc.parameters()), list(module.ae.parameters())

    # The same forward, written naively: every term sees every parameter.
    posterior = module.ae.encode(images)
    recon = module.ae.decode(posterior.sample(torch.Generator().manual_seed(seed)))
    ae_objective = ((images - recon).abs().mean() + cfg.kl_weight * posterior.kl().mean() / images[0].numel()
                    + metrics["d_weight"] * -module.disc(recon).mean())
    d_objective = hinge_d_loss(module.disc(images), module.disc(recon.detach()))
    torch.testing.assert_close(total, ae_objective + d_objective)

    for got, want in zip(grads(total, disc_params), grads(d_objective, disc_params)):
        torch.testing.assert_close(got, want)
    for got, want in zip(grads(total, ae_params), grads(ae_objective, ae_params)):
        torch.testing.assert_close(got, want)
    # ...whereas the naive sum would push the generator's goal into the critic.
    naive = grads(ae_objective + d_objective, disc_params)
    assert any(not torch.allclose(a, b) for a, b in zip(naive, grads(d_objective, disc_params)))

    cfg.disc_start = 5
    _, before = autoencoder_losses(module, images, 4, cfg)
    assert not {"g_loss", "d_loss"} & set(before)  # before disc_start: no GAN terms


def test_discriminator_config_trains_a_few_steps_in_one_process(tmp_path):
    from components.common.train_loop import LocalSession, train_loop

    class Task(AutoencoderTask):
        def export(self, model, ema_model, out_dir):
            super().export(model, ema_model, out_dir)
            save_file(model.disc.state_dict(), str(out_dir / "disc.safetensors"))

    cfg = AutoencoderConfig(**TINY, disc_start=0, disc_channels=8, disc_layers=2,
                            train=TrainConfig(max_steps=3, batch_size=8, lr=1e-3, log_every=1, ema_decay=0.5))
    images = digits(32)
    task = Task(cfg, build_step_autoencoder(cfg, INFO).arguments, None, in_memory=(images, torch.zeros(len(images), dtype=torch.long)))
    final = train_loop(task, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 3 and all(np.isfinite(final[k]) for k in ("g_loss", "d_loss", "d_weight", "rec_loss"))

    export = sorted((tmp_path / "ckpt").iterdir())[-1] / "export"
    torch.manual_seed(cfg.train.seed)  # train_loop seeds before building: the same initial weights
    initial = task.build_model().disc.state_dict()
    trained_disc = load_file(str(export / "disc.safetensors"))
    assert any(not torch.equal(initial[k], trained_disc[k]) for k in initial if k.endswith("weight"))
    assert all(not k.startswith("disc") for k in load_file(str(export / AE_WEIGHTS)))  # autoencoder only


def test_lpips_missing_file_fails_at_start_naming_the_path(tmp_path):
    missing = tmp_path / "no" / "lpips_vgg.safetensors"
    cfg = AutoencoderConfig(**TINY, lpips_weights=str(missing))
    fake_shard = Manifest("shard", "k", "1", str(tmp_path), {}, {}, [], info={})
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run(cfg, {"shard": fake_shard}, make_ctx(tmp_path, "autoencoder"))


def test_lpips_from_a_local_file_joins_the_loss(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "lpips.safetensors"
    state = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}  # as trained
    # save_model may keep either alias of lpips' heads: here the ModuleList one for lin1
    state["lins.1.model.1.weight"] = state.pop("lin1.model.1.weight")
    save_file(state, str(path))
    lpips = load_lpips(str(path))
    x = digits(2).float() / 127.5 - 1
    assert lpips(x, x).abs().max() < 1e-6 and (lpips(x, x.flip(-1)) > 0).all()
    module, cfg = tiny_module(disc_start=None)
    cfg.lpips_weights = str(path)
    _, metrics = autoencoder_losses(module, x, 0, cfg, None, lpips)
    assert metrics["lpips"] > 0


def test_model_arguments_are_checked_against_the_shards():
    # ae-tiny is an RGB preset; on 1-channel shards it takes their channels
    assert build_step_autoencoder(AutoencoderConfig(preset="ae-tiny"), INFO).arguments["in_channels"] == 1
    assert build_step_autoencoder(AutoencoderConfig(preset="ae-tiny"), {**INFO, "channels": 3}).arguments["in_channels"] == 3
    with pytest.raises(ValueError, match=r"autoencoder.model.in_channels: 3 \(the data gives 1\)"):
        build_step_autoencoder(AutoencoderConfig(preset="ae-tiny", model={"in_channels": 3}), INFO)
    with pytest.raises(ValueError, match="unknown argument"):
        build_step_autoencoder(AutoencoderConfig(preset="ae-tiny", model={"in_channels": 1, "depth": 3}), INFO)
    with pytest.raises(ValueError, match="not divisible"):
        build_step_autoencoder(AutoencoderConfig(**TINY), {"channels": 1, "image_size": 33})


# ---------------------------------------------------------------- the step on Ray


@pytest.mark.integration
def test_step_trains_exports_and_measures(trained, shard_manifest):
    manifest, tracker = trained
    assert sorted(f.path for f in manifest.files) == sorted([AE_WEIGHTS, AE_META, RECONSTRUCTIONS])
    assert manifest.verify() == []
    model, meta = load_autoencoder(manifest)
    assert isinstance(model, AutoencoderKL) and not model.training
    assert meta.latent_shape == [4, 16, 16] and meta.downsample_factor == 2 and meta.kind == "kl"
    assert meta.channels == 1 and meta.image_size == 32 and meta.classes == [str(d) for d in range(10)]
    assert meta.scale_factor == manifest.metrics["scale_factor"] > 0

    # Round trip through the scaled latent space.
    storage = shard_manifest.storage()
    val, _, _ = read_image_shards(storage, shard_manifest.info["val_shards"], "png")
    latents = encode_scaled(model, meta, val)
    assert latents.shape == (len(val), 4, 16, 16)
    decoded = decode_scaled(model, meta, latents)
    assert decoded.shape == (len(val), 1, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1

    # Training helped: logged reconstruction loss fell, PSNR beats the untrained model's.
    rec = [m.value for m in sorted(tracker.client.get_metric_history(tracker.run_id, "rec_loss"), key=lambda m: m.step)]
    assert len(rec) == 6 and rec[-1] < 0.7 * rec[0], rec
    torch.manual_seed(0)
    untrained = AutoencoderKL(**meta.model).eval()
    untrained_psnr = reconstruction_metrics(untrained, val[:16])[0]["val_psnr"]
    assert manifest.metrics["val_psnr"] > untrained_psnr + 3, (manifest.metrics, untrained_psnr)
    assert manifest.metrics["val_mse"] > 0 and manifest.metrics["images_per_s"] > 0
    assert np.isfinite(manifest.metrics["train_loss"])

    # Scaled posterior samples of training images have unit variance.
    train, _, _ = read_image_shards(storage, shard_manifest.info["train_shards"], "png")
    scaled = encode_scaled(model, meta, train, generator=torch.Generator().manual_seed(1), sample=True)
    assert 0.85 < float(scaled.std()) < 1.15

    assert all(not k.startswith("disc") for k in load_file(str(storage_path(manifest, AE_WEIGHTS))))
    artifacts = {a.path for a in tracker.client.list_artifacts(tracker.run_id)}
    assert {RECONSTRUCTIONS, AE_META} <= artifacts
    assert "val_psnr" in tracker.client.get_run(tracker.run_id).data.metrics


def storage_path(manifest: Manifest, name: str) -> Path:
    return manifest.storage().path(name)
