"""The latents step on the autoencoder trained in tests/test_autoencoder.py (one shared fit): its
Ray Data actor pool against the in-process per-shard encoder, the pool's budget check, the latent
shard reader (local and S3) and the in-worker batch iterator."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset

from components.autoencoder.load import AE_META, AE_WEIGHTS, decode_scaled, encode_scaled, load_autoencoder
from components.common.config import StepResources
from components.common.parallel import check_pool_fits_cluster
from components.common.shard_reader import read_image_shards
from components.common.step import Manifest
from components.common.storage import Storage
from components.latents.config import LatentsConfig
from components.latents.load import load_latent_shards
from components.latents.run import ShardEncoder, encode_shard, latent_shard_name, run
from test_autoencoder import make_ctx, manifest_from, shard_manifest, trained  # noqa: F401 (fixtures)

_CACHE: dict[str, object] = {}
# Posterior-mode latents of the 30-step test autoencoder decode to 20.5 dB (train and val, measured);
# an untrained one gives about 6 dB. The floor leaves room for run-to-run noise.
PSNR_FLOOR_DB = 16.0


@pytest.fixture(scope="module")
def latents(trained, shard_manifest, tmp_path_factory) -> Manifest:
    if "latents" not in _CACHE:
        ctx = make_ctx(tmp_path_factory.mktemp("latents"), "latents", workers=2)
        out = run(LatentsConfig(batch_size=64), {"shard": shard_manifest, "autoencoder": trained[0]}, ctx)
        _CACHE["latents"] = manifest_from(out, ctx)
    return _CACHE["latents"]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR of two [-1, 1] batches."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@pytest.mark.integration
def test_latents_step_encodes_every_image(latents, trained, shard_manifest):
    ae_manifest = trained[0]
    info, shard_info = latents.info, shard_manifest.info
    assert latents.verify() == []
    assert info["train_shards"] == [f"train/latents-{i:05d}.tar" for i in range(len(shard_info["train_shards"]))]
    assert info["val_shards"] == [f"val/latents-{i:05d}.tar" for i in range(len(shard_info["val_shards"]))]
    assert info["counts"] == {"train": shard_manifest.metrics["num_train"], "val": shard_manifest.metrics["num_val"]}
    assert latents.metrics["num_train"] + latents.metrics["num_val"] == 300
    assert info["latent_shape"] == [4, 16, 16] and info["classes"] == shard_info["classes"]
    assert info["scale_factor"] == ae_manifest.metrics["scale_factor"]
    assert np.isfinite(latents.metrics["latent_mean"]) and 0.3 < latents.metrics["latent_std"] < 1.5

    # The reader gives back exactly what the autoencoder makes of the shard's images, in order.
    model, meta = load_autoencoder(ae_manifest)
    for split in ("train", "val"):
        z, labels = load_latent_shards(latents, split)
        images, image_labels, _ = read_image_shards(shard_manifest.storage(), shard_info[f"{split}_shards"], "png")
        assert z.dtype == torch.float32 and labels.dtype == torch.int64
        assert z.shape == (len(images), 4, 16, 16) and torch.equal(labels, torch.from_numpy(image_labels))
        torch.testing.assert_close(z, encode_scaled(model, meta, images), rtol=1e-4, atol=1e-4)
        decoded = decode_scaled(model, meta, z)
        assert psnr(decoded, torch.from_numpy(images).float() / 127.5 - 1) > PSNR_FLOOR_DB


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
def test_step_shards_equal_the_in_process_encoder_on_every_shard(latents, trained, shard_manifest, tmp_path):
    """The actor pool adds nothing to the bytes: each latent shard it wrote is what ``encode_shard``
    writes for that shard, in this process, at the same batch size; and the step's moments are
    the sum of the per-shard ones. One thread, as in the actors (Ray sets OMP_NUM_THREADS to their
    CPUs, here 0.5 -> 1): BLAS rounding depends on the thread count (measured: 2 threads change
    bytes of val/latents-00000.tar)."""
    model, meta = load_autoencoder(trained[0])
    here = Storage.from_uri(str(tmp_path / "here"))
    results = []
    for split in ("train", "val"):
        for index, rel in enumerate(shard_manifest.info[f"{split}_shards"]):
            results.append(encode_shard(split, index, shard_manifest.location, rel, model, meta,
                                        LatentsConfig(batch_size=64), here))
            name = latent_shard_name(split, index)
            assert results[-1]["file"] == name
            assert here.read_bytes(name) == latents.storage().read_bytes(name), name
    train = [r for r in results if r["split"] == "train"]
    assert [sum(r["count"] for r in results if r["split"] == s) for s in ("train", "val")] == [
        latents.metrics["num_train"], latents.metrics["num_val"]]
    mean = sum(r["sum"] for r in train) / sum(r["elements"] for r in train)
    assert latents.metrics["latent_mean"] == pytest.approx(mean, rel=1e-9)


@pytest.mark.integration
def test_shard_encoder_loads_the_autoencoder_once_per_actor(trained, shard_manifest, tmp_path, monkeypatch):
    """In-process, outside Ray's pool: one load in the constructor, however many shards follow; each
    call's row is ``encode_shard``'s result; no GPU given, so the model stays on the CPU."""
    import components.autoencoder.load as ae_load

    loads, real_load = [], ae_load.load_autoencoder

    def counted_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ae_load, "load_autoencoder", counted_load)
    cfg, output = LatentsConfig(batch_size=64), Storage.from_uri(str(tmp_path / "actor"))
    encoder = ShardEncoder(trained[0], shard_manifest.location, cfg, output)
    assert next(encoder.model.parameters()).device.type == "cpu"
    rels = shard_manifest.info["val_shards"]
    rows = [encoder({"split": np.array(["val"]), "index": np.array([i]), "rel": np.array([rel])})
            for i, rel in enumerate(rels)]
    assert len(loads) == 1
    expected = encode_shard("val", 1, shard_manifest.location, rels[1], encoder.model, encoder.meta, cfg,
                            Storage.from_uri(str(tmp_path / "direct")))
    assert {key: value[0].item() for key, value in rows[1].items()} == expected


@pytest.mark.integration
def test_pool_larger_than_the_cluster_is_refused_naming_the_setting(trained, shard_manifest, tmp_path, monkeypatch):
    """The test Ray has 2 CPUs and no GPU: Ray Data would wait for these actors forever."""
    inputs = {"shard": shard_manifest, "autoencoder": trained[0]}
    for resources, message in (
            (StepResources(num_workers=3, cpus_per_worker=1),
             r"latents\.resources\.num_workers \(3\) x latents\.resources\.cpus_per_worker \(1\) = 3 CPUs, "
             r"but the Ray cluster has 2"),
            (StepResources(num_workers=1, cpus_per_worker=0.5, gpus_per_worker=1),
             r"latents\.resources\.gpus_per_worker \(1\) = 1 GPUs, but the Ray cluster has 0")):
        ctx = make_ctx(tmp_path, "latents")
        ctx.resources = resources
        with pytest.raises(ValueError, match=message):
            run(LatentsConfig(), inputs, ctx)
        assert not (tmp_path / "latents").exists()  # refused before any shard was encoded
    monkeypatch.setenv("LATENTFLOW_AUTOSCALING", "1")  # nodes may still come: not refused
    check_pool_fits_cluster("latents", StepResources(num_workers=3, cpus_per_worker=1))


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")  # the step's actors run one thread; see the test above
def test_latent_shards_are_deterministic_and_sampling_is_seeded_by_key(latents, trained, shard_manifest, tmp_path):
    model, meta = load_autoencoder(trained[0])
    rel = shard_manifest.info["train_shards"][0]
    name = "train/latents-00000.tar"

    def encode(cfg: LatentsConfig, output: Storage) -> None:
        encode_shard("train", 0, shard_manifest.location, rel, model, meta, cfg, output)

    again = Storage.from_uri(str(tmp_path / "again"))
    encode(LatentsConfig(batch_size=64), again)
    assert again.read_bytes(name) == latents.storage().read_bytes(name)  # a re-run is byte-identical
    # Another batch size changes only float rounding (BLAS blocking), never which latent is whose.
    rebatched = Storage.from_uri(str(tmp_path / "rebatched"))
    encode(LatentsConfig(batch_size=7), rebatched)
    by_key = {}
    for storage in (again, rebatched):
        local = tmp_path / f"{id(storage)}.tar"
        storage.download(name, local)
        by_key[id(storage)] = {s["__key__"]: np.load(io.BytesIO(s["latent.npy"]))
                               for s in webdataset.WebDataset(str(local), shardshuffle=False)}
    first, second = by_key.values()
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_allclose(first[key], second[key], rtol=1e-4, atol=1e-5)

    sampled = Storage.from_uri(str(tmp_path / "sampled"))
    for _ in range(2):
        encode(LatentsConfig(posterior="sample", dtype="float16"), sampled)
        first_bytes = sampled.read_bytes(name) if _ == 0 else first_bytes
    assert sampled.read_bytes(name) == first_bytes and first_bytes != again.read_bytes(name)


@pytest.mark.integration
def test_readers_work_from_s3(latents, trained, s3_bucket):
    def to_s3(manifest: Manifest, prefix: str) -> Manifest:
        remote = Storage.from_uri(f"s3://{s3_bucket}/{prefix}")
        for record in manifest.files:
            remote.write_bytes(record.path, manifest.storage().read_bytes(record.path))
        return Manifest(**{**manifest.__dict__, "location": remote.uri()})

    ae_remote, latents_remote = to_s3(trained[0], "ae"), to_s3(latents, "latents")
    model, meta = load_autoencoder(ae_remote)
    assert meta.to_json() == json.loads(trained[0].storage().read_text(AE_META))
    local_model, _ = load_autoencoder(trained[0])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local_model.state_dict().values()))
    for split in ("train", "val"):
        remote_z, remote_y = load_latent_shards(latents_remote, split)
        local_z, local_y = load_latent_shards(latents, split)
        assert torch.equal(remote_z, local_z) and torch.equal(remote_y, local_y)

    tampered = Manifest(**{**ae_remote.__dict__, "files": [
        type(f)(f.path, "0" * 64, f.size) if f.path == AE_WEIGHTS else f for f in ae_remote.files]})
    with pytest.raises(RuntimeError, match="sha256"):
        load_autoencoder(tampered)


