"""The latents step on the autoencoder trained in tests/test_autoencoder.py (one shared fit), the
latent shard reader (local and S3) and the in-worker batch iterator."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset

from components.autoencoder.load import AE_META, AE_WEIGHTS, decode_scaled, encode_scaled, load_autoencoder
from components.common.shard_reader import rank_batch_indices, read_image_shards
from components.common.step import Manifest
from components.latents.config import LatentsConfig
from components.latents.data import latent_batches, load_latent_shards
from components.latents.run import encode_shard, run
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
def test_latent_shards_are_deterministic_and_sampling_is_seeded_by_key(latents, trained, shard_manifest, tmp_path):
    from components.common.storage import Storage

    rel = shard_manifest.info["train_shards"][0]
    name = "train/latents-00000.tar"
    again = Storage.from_uri(str(tmp_path / "again"))
    encode_shard("train", 0, shard_manifest.location, rel, trained[0], LatentsConfig(batch_size=64), again)
    assert again.read_bytes(name) == latents.storage().read_bytes(name)  # a re-run is byte-identical
    # Another batch size changes only float rounding (BLAS blocking), never which latent is whose.
    rebatched = Storage.from_uri(str(tmp_path / "rebatched"))
    encode_shard("train", 0, shard_manifest.location, rel, trained[0], LatentsConfig(batch_size=7), rebatched)
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
        encode_shard("train", 0, shard_manifest.location, rel, trained[0],
                     LatentsConfig(posterior="sample", dtype="float16"), sampled)
        first_bytes = sampled.read_bytes(name) if _ == 0 else first_bytes
    assert sampled.read_bytes(name) == first_bytes and first_bytes != again.read_bytes(name)


@pytest.mark.integration
def test_readers_work_from_s3(latents, trained, s3_bucket):
    from components.common.storage import Storage

    def to_s3(manifest: Manifest, prefix: str) -> Manifest:
        remote = Storage.from_uri(f"s3://{s3_bucket}/{prefix}")
        for record in manifest.files:
            remote.write_bytes(record.path, manifest.storage().read_bytes(record.path))
        return Manifest(**{**manifest.__dict__, "location": remote.uri()})

    ae_remote, latents_remote = to_s3(trained[0], "ae"), to_s3(latents, "latents")
    model, meta = load_autoencoder(ae_remote)
    assert meta == json.loads(trained[0].storage().read_text(AE_META))
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


def test_latent_batches_equal_counts_per_rank_and_seeded_order():
    z = torch.arange(103, dtype=torch.float32).reshape(103, 1, 1, 1).expand(103, 4, 2, 2).contiguous()
    y = torch.arange(103)

    def epoch(rank, world, seed=0, number=0):
        return list(latent_batches(z, y, 8, seed, number, rank, world))

    for world in (1, 2, 3):
        ranks = [epoch(r, world) for r in range(world)]
        assert len({len(b) for b in ranks}) == 1 and len(ranks[0]) == (103 // world) // 8
        seen = torch.cat([b["label"] for batches in ranks for b in batches])
        assert len(set(seen.tolist())) == len(seen)  # no sample twice in an epoch
        for batches in ranks:
            for b in batches:
                assert b["latent"].shape == (8, 4, 2, 2) and torch.equal(b["latent"][:, 0, 0, 0].long(), b["label"])
    first = [b["label"] for b in epoch(1, 2)]
    assert all(torch.equal(a, b["label"]) for a, b in zip(first, epoch(1, 2)))  # same seed, same order
    assert not torch.equal(first[0], epoch(1, 2, number=1)[0]["label"])  # epochs differ
    assert not torch.equal(first[0], epoch(1, 2, seed=1)[0]["label"])  # seeds differ
    with pytest.raises(ValueError):
        rank_batch_indices(10, 2, 0, 0, rank=2, world_size=2)
