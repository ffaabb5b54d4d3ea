"""Captions travel: the latents step copies ``<key>.txt`` into its latent shards, and the training
stream yields ``batch["caption"]`` when asked (and exactly what it yielded before when not). Real
shards written by the shard step's chunk task, a tiny untrained autoencoder, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.common.data import ImageDecoder, LatentDecoder, ShardDataError, has_captions, image_split, latent_split
from components.common.shard_reader import iter_shard_samples
from components.common.step import FileRecord, Manifest
from components.common.storage import Storage
from components.common.stream import LoaderConfig, ShardSource, TensorSource
from components.latents.config import LatentsConfig
from components.latents.run import encode_shard
from components.shard.captions import caption_plan
from components.shard.config import ShardConfig
from components.shard.run import shard_chunk
from components.shard.sources import open_source
import metas

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLES = 24


def shard_step(out: Path, captions: str) -> Manifest:
    """The shard step's output for the first SAMPLES digits, as one chunk task writes it."""
    cfg = ShardConfig(source="builtin:mnist", captions=captions, max_samples=SAMPLES, val_fraction=0.0)
    source = open_source(cfg.source)
    storage = Storage.from_uri(str(out))
    result = shard_chunk(0, source.list_items()[0][:SAMPLES], source, cfg, storage, caption_plan(cfg))
    info = {"train_shards": result["files"]["train"], "train_counts": result["file_counts"]["train"],
            "val_shards": [], "val_counts": [], "image_format": "png", "on_bad_sample": "fail"}
    if captions != "none":
        info["captions"] = captions
    return manifest(out, "shard", info)


def manifest(out: Path, step: str, info: dict) -> Manifest:
    storage = Storage.from_uri(str(out))
    files = [FileRecord(rel, storage.sha256(rel), storage.size(rel)) for rel in info["train_shards"]]
    return Manifest(step=step, cache_key="k", code_version="1", location=storage.uri(), config={}, upstream={},
                    files=files, info=info)


def members(storage: Storage, rel: str) -> list[dict]:
    return list(iter_shard_samples(storage, [rel]))


def batches(spec, decoder) -> list:
    source = ShardSource(spec, decoder, 8, 0, 0, 1, LoaderConfig(shuffle_window=16, prefetch_batches=2))
    try:
        return list(source.epoch(0, 0, 0))
    finally:
        source.close()


def test_stream_yields_captions_on_request_only(tmp_path):
    shards = shard_step(tmp_path / "captioned", "attributes")
    captions = {s["__key__"]: s["txt"].decode() for s in members(shards.storage(), shards.info["train_shards"][0])}
    asked = batches(image_split(shards, "train", captions=True), ImageDecoder("png", captions=True))
    plain = batches(image_split(shards, "train"), ImageDecoder("png"))
    assert len(asked) == len(plain) == SAMPLES // 8
    for with_text, without in zip(asked, plain):
        assert with_text.tensors["caption"] == [captions[k.split(":")[1]] for k in with_text.keys]
        assert set(without.tensors) == {"image", "label"}  # what every stage got before
        assert with_text.keys == without.keys and torch.equal(with_text.tensors["image"], without.tensors["image"])
    assert has_captions(shards)

    bare = shard_step(tmp_path / "bare", "none")
    assert not has_captions(bare)
    with pytest.raises(ValueError, match="shard: its shards carry no captions"):
        image_split(bare, "train", captions=True)
    image = members(bare.storage(), bare.info["train_shards"][0])[0]["png"]
    with pytest.raises(ShardDataError, match="'k': has no caption"):
        ImageDecoder("png", captions=True)("k", {"png": image})
    with pytest.raises(ShardDataError, match="'k': caption is not UTF-8"):
        ImageDecoder("png", captions=True)("k", {"png": image, "txt": b"\xff"})


def test_latents_carry_captions_unchanged(tmp_path):
    from components.autoencoder.model import build_autoencoder

    torch.manual_seed(0)
    model = build_autoencoder("ae-mnist").eval()
    meta = metas.ae_meta(image_format="png", image_size=32, scale_factor=0.5)
    out = Storage.from_uri(str(tmp_path / "latents"))
    written = {}
    for captions in ("attributes", "none"):
        shards = shard_step(tmp_path / captions, captions)
        rel = shards.info["train_shards"][0]
        result = encode_shard("train", 0, shards.output_uri, rel, model, meta, LatentsConfig(batch_size=10),
                              out.child(captions))
        written[captions] = members(out.child(captions), result["file"])
        images = members(shards.storage(), rel)
        assert [s["__key__"] for s in written[captions]] == [s["__key__"] for s in images]
        for latent, image in zip(written[captions], images):
            assert latent.get("txt") == image.get("txt")  # the same bytes, or absent in both
    assert all(sorted(k for k in s if not k.startswith("__")) == ["cls", "latent.npy"] for s in written["none"])
    assert [s["latent.npy"] for s in written["none"]] == [s["latent.npy"] for s in written["attributes"]]

    latents = manifest(tmp_path / "latents" / "attributes", "latents",
                       {"train_shards": ["train/latents-00000.tar"], "train_counts": [SAMPLES], "val_shards": [],
                        "val_counts": [], "captions": "attributes", "on_bad_sample": "fail"})
    streamed = batches(latent_split(latents, "train", captions=True), LatentDecoder(captions=True))
    by_key = {s["__key__"]: s["txt"].decode() for s in written["attributes"]}
    for batch in streamed:
        assert batch.tensors["caption"] == [by_key[k.split(":")[1]] for k in batch.keys]
        assert batch.tensors["latent"].shape[0] == 8


def test_tensor_source_indexes_caption_lists_like_tensors():
    values = torch.arange(12)
    captions = [f"c{i}" for i in range(12)]
    source = TensorSource({"x": values, "caption": captions}, micro_batch=4, seed=0, rank=0, world_size=1, window=12)
    for batch in source.epoch(0, 0, 0):
        assert batch.tensors["caption"] == [f"c{int(i)}" for i in batch.tensors["x"]]
