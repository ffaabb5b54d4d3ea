"""The streaming data path (components/common/{epoch_plan,tar_index,sample_reader,stream}.py): the
epoch plan's arithmetic, random access into tar shards, resumable batch streams from local and S3
shards, and bad data in the stream. No Ray here: the two-worker and two-node runs are elsewhere."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from components.common import sample_reader as sample_reader_module
from components.common.data import ImageDecoder, LatentDecoder, ShardDataError
from components.common.epoch_plan import EpochPlan
from components.common.sample_reader import SplitSpec
from components.common.shard_files import with_retries
from components.common.storage import Storage, StorageError
from components.common.stream import LoaderConfig, ShardSource, TensorSource
from components.common.tar_index import index_tar

COUNTS = (7, 9, 8, 11, 10, 6)  # uneven shards, 51 samples


def latent_bytes(value: float) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.full((2, 2), value, np.float32))
    return buffer.getvalue()


def write_shards(directory: Path, counts=COUNTS) -> list[str]:
    """Shards s<k>.tar of samples k<k>_<i> whose latent is filled with 100k + i and cls i % 3."""
    directory.mkdir(parents=True, exist_ok=True)
    rels = []
    for shard, count in enumerate(counts):
        rel = f"s{shard}.tar"
        with open(directory / rel, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False)
            for i in range(count):
                writer.write({"__key__": f"k{shard}_{i}", "latent.npy": latent_bytes(100 * shard + i),
                              "cls": str(i % 3).encode()})
            writer.close()
        rels.append(rel)
    return rels


def spec_of(location: str, rels, counts=COUNTS, policy="fail") -> SplitSpec:
    return SplitSpec(location, tuple(rels), tuple(counts), ("latent.npy",), ("cls",), policy, "toy train")


def source(spec, rank=0, world=2, micro=4, window=10, seed=0, threads=1) -> ShardSource:
    return ShardSource(spec, LatentDecoder(), micro, seed, rank, world,
                       LoaderConfig(shuffle_window=window, decode_threads=threads, prefetch_batches=2))


def epoch_keys(src: ShardSource, epoch=0, position=0, done=0) -> list[list[str]]:
    return [batch.keys for batch in src.epoch(epoch, position, done)]


# ---------------------------------------------------------------- the plan


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_gives_ranks_disjoint_equal_spans_in_shuffled_windows(world):
    seen = []
    for rank in range(world):
        plan = EpochPlan(COUNTS, seed=5, epoch=1, rank=rank, world_size=world, window=8)
        order = np.concatenate([plan.window_order(j) for j in range(plan.num_windows)])
        assert sorted(order.tolist()) == list(range(plan.span_length))  # each window a permutation
        assert plan.span_length == sum(COUNTS) // world
        shards, samples = plan.locate(order)
        assert all(0 <= s < COUNTS[k] for k, s in zip(shards, samples))
        seen += list(zip(shards.tolist(), samples.tolist()))
        if world > 1:  # a rank reads its span's shards, not every shard
            assert len(set(shards.tolist())) < len(COUNTS)
    assert len(seen) == len(set(seen)) == world * (sum(COUNTS) // world)


def test_plan_is_seeded_and_epochs_differ():
    def order(seed, epoch):
        plan = EpochPlan(COUNTS, seed, epoch, 0, 2, 8)
        return [e[2:] for _, e in zip(range(plan.span_length), plan.entries())]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    unshuffled = EpochPlan(COUNTS, None, 0, 0, 1, 8)
    first = [e[2:] for _, e in zip(range(9), unshuffled.entries())]
    assert first == [(0, i) for i in range(7)] + [(1, 0), (1, 1)]  # manifest order


def test_plan_entries_resume_anywhere_and_wrap_around():
    plan = EpochPlan(COUNTS, 3, 0, 1, 2, 6)
    full = [e for _, e in zip(range(2 * plan.span_length), plan.entries())]
    for start in (0, 5, 6, 13, plan.span_length - 1, plan.span_length + 2):
        tail = [e for _, e in zip(range(len(full) - start), plan.entries(start))]
        assert tail == full[start:]
    assert [e[2:] for e in full[plan.span_length:]] == [e[2:] for e in full[:plan.span_length]]


def test_plan_names_the_shards_of_each_window():
    plan = EpochPlan(COUNTS, 2, 0, 0, 2, 5)
    for j in range(plan.num_windows):
        shards, _ = plan.locate(plan.window_order(j))
        assert set(shards.tolist()) <= set(plan.shards_of_window(j))


# ---------------------------------------------------------------- tar index


def test_index_matches_webdataset_and_reads_members_at_their_offsets(tmp_path):
    rel = write_shards(tmp_path, (5,))[0]
    index = index_tar(tmp_path / rel)
    assert index.problems == [] and index.keys == [f"k0_{i}" for i in range(5)]
    with open(tmp_path / rel, "rb") as stream:
        expected = list(wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander([{"url": rel, "stream": stream}])))
    with open(tmp_path / rel, "rb") as handle:
        for members, sample in zip(index.members, expected):
            assert set(members) == {"latent.npy", "cls"}
            for suffix, (offset, size) in members.items():
                assert sample_reader_module.read_member(handle, offset, size) == sample[suffix]


def test_index_of_a_truncated_shard_keeps_what_is_whole(tmp_path):
    rel = write_shards(tmp_path, (6,))[0]
    path = tmp_path / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    index = index_tar(path, name="s3://bucket/train/s0.tar")
    assert 0 < len(index) < 6
    assert any("s3://bucket/train/s0.tar" in p for p in index.problems)
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file at all" * 40)
    assert len(index_tar(tmp_path / "garbage.tar")) == 0


# ---------------------------------------------------------------- batch streams


def test_every_rank_gets_the_same_batch_count_and_no_sample_twice(tmp_path):
    rels = write_shards(tmp_path)
    spec = spec_of(str(tmp_path), rels)
    keys = []
    for rank in range(3):
        src = source(spec, rank=rank, world=3, micro=4)
        batches = epoch_keys(src)
        assert len(batches) == (sum(COUNTS) // 3) // 4 == src.batches_per_epoch(0)
        keys += [k for batch in batches for k in batch]
        src.close()
    assert len(keys) == len(set(keys)) == 3 * 4 * 4


def test_a_resumed_stream_yields_exactly_the_rest_of_the_epoch_and_reads_nothing_before(tmp_path, monkeypatch):
    rels = write_shards(tmp_path)
    spec = spec_of(str(tmp_path), rels)
    full = list(source(spec).epoch(0, 0, 0))
    resume_after = 3
    reads: list[tuple[str, int]] = []  # (shard, offset) of every member read
    real_read = sample_reader_module.read_member
    monkeypatch.setattr(sample_reader_module, "read_member", lambda handle, offset, size: reads.append(
        (Path(handle.name).name, offset)) or real_read(handle, offset, size))
    resumed = list(source(spec, threads=0).epoch(0, full[resume_after - 1].position, resume_after))
    assert [b.keys for b in resumed] == [b.keys for b in full[resume_after:]]
    for a, b in zip(resumed, full[resume_after:]):
        assert torch.equal(a.tensors["latent"], b.tensors["latent"]) and a.position == b.position
    consumed = {k for b in full[:resume_after] for k in b.keys}
    offsets = {}
    for rel in rels:  # where each consumed sample's files lie
        index = index_tar(tmp_path / rel)
        for key, members in zip(index.keys, index.members):
            offsets[f"{rel}:{key}"] = {(rel, offset) for offset, _ in members.values()}
    assert not any(set(reads) & offsets[k] for k in consumed)  # nothing consumed was read again
    assert len(reads) >= 2 * sum(len(b.keys) for b in resumed)  # ... and what it yields was read once


def test_local_and_s3_streams_give_the_same_batches(tmp_path, s3_bucket):
    rels = write_shards(tmp_path / "local")
    remote = Storage.from_uri(f"s3://{s3_bucket}/latents")
    for rel in rels:
        remote.upload(rel, tmp_path / "local" / rel)
    local = list(source(spec_of(str(tmp_path / "local"), rels), rank=1, micro=3).epoch(1, 0, 0))
    src = source(spec_of(remote.uri(), rels), rank=1, micro=3)
    from_s3 = list(src.epoch(1, 0, 0))
    scratch = src.reader.files._scratch
    assert [b.keys for b in from_s3] == [b.keys for b in local]
    assert all(torch.equal(a.tensors["latent"], b.tensors["latent"]) for a, b in zip(from_s3, local))
    assert len(list(scratch.iterdir())) <= 4  # only the current and next windows' shards are staged
    src.close()
    assert not scratch.exists()


def test_a_missing_s3_shard_fails_naming_the_object(s3_bucket):
    src = source(spec_of(f"s3://{s3_bucket}/nothing-here", [f"s{i}.tar" for i in range(6)]))
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/nothing-here/s"):
        list(src.epoch(0, 0, 0))
    src.close()


def test_transient_errors_are_retried_then_named_and_lasting_ones_fail_at_once():
    calls = []

    def flaky(failures, transient=True):
        def call():
            calls.append(1)
            if len(calls) <= failures:
                raise StorageError("read s3://b/k: SlowDown", transient=transient)
            return "bytes"
        return call

    assert with_retries("read s3://b/k", flaky(2), retries=3, base_s=0) == "bytes" and len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError, match="s3://b/k"):
        with_retries("read s3://b/k", flaky(5), retries=2, base_s=0)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError):
        with_retries("read s3://b/k", flaky(1, transient=False), retries=3, base_s=0)
    assert len(calls) == 1


def corrupt(tmp_path: Path, rels):
    """Shard 1's sample k1_4 gets unreadable latent bytes; shard 3 loses its second half."""
    path = tmp_path / rels[1]
    rewritten = tmp_path / "rewritten.tar"
    with tarfile.open(path) as archive, open(rewritten, "wb") as out:
        writer = wds.TarWriter(out, encoder=False)
        samples = {}
        for member in archive.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = archive.extractfile(member).read()
        for key, fields in samples.items():
            if key == "k1_4":
                fields["latent.npy"] = b"\x93NUMPY garbage"
            writer.write({"__key__": key, **fields})
        writer.close()
    rewritten.replace(path)
    cut = tmp_path / rels[3]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])


def test_bad_samples_are_skipped_counted_and_named_under_skip(tmp_path, caplog):
    rels = write_shards(tmp_path)
    corrupt(tmp_path, rels)
    keys, skipped = [], 0
    with caplog.at_level(logging.WARNING):
        for rank in range(2):
            src = source(spec_of(str(tmp_path), rels, policy="skip"), rank=rank, window=64)
            batches = list(src.epoch(0, 0, 0))
            assert len(batches) == src.batches_per_epoch(0)  # skips are refilled: counts stay equal
            keys += [k for b in batches for k in b.keys]
            skipped += sum(b.skipped for b in batches)
            src.close()
    assert "s1.tar:k1_4" not in keys and skipped >= 2
    assert "sample 'k1_4' of s1.tar" in caplog.text and "cannot read its latent" in caplog.text
    assert "s3.tar" in caplog.text and "missing from the shard" in caplog.text


def test_bad_samples_fail_the_stream_naming_shard_and_key_under_fail(tmp_path):
    rels = write_shards(tmp_path)
    corrupt(tmp_path, rels)
    src = source(spec_of(str(tmp_path), rels, policy="fail"), rank=0, world=1, window=64)
    with pytest.raises(ShardDataError, match=r"toy train: sample '.*' of s[13]\.tar: .*on_bad_sample: fail"):
        list(src.epoch(0, 0, 0))
    src.close()


def test_image_decoder_resizes_with_the_one_resampler():
    from PIL import Image

    from components.common.resample import resize_uint8

    pixels = np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    out = ImageDecoder("png", size=6)("x", {"png": buffer.getvalue(), "cls": b"4"})
    assert out["image"].shape == (1, 6, 6) and int(out["label"]) == 4
    assert np.array_equal(out["image"], resize_uint8(pixels[None, None], 6)[0])
    with pytest.raises(ShardDataError, match="'x': cannot decode"):
        ImageDecoder("png")("x", {"png": b"no png"})


def test_tensor_source_follows_the_same_plan():
    values = torch.arange(51).float()[:, None]
    src = TensorSource({"x": values}, micro_batch=4, seed=0, rank=1, world_size=2, window=10)
    batches = list(src.epoch(0, 0, 0))
    plan = EpochPlan((51,), 0, 0, 1, 2, 10)
    expected = [sample for _, (_, _, _, sample) in zip(range(24), plan.entries())]
    assert torch.cat([b.tensors["x"] for b in batches]).flatten().long().tolist() == expected
    tail = list(src.epoch(0, batches[1].position, 2))
    assert [b.keys for b in tail] == [b.keys for b in batches[2:]]


def test_decode_image_keeps_grayscale_one_channel_and_rgb_three():
    from PIL import Image

    from components.common.data import decode_image

    def png(mode, shape):
        buffer = io.BytesIO()
        Image.fromarray(np.zeros(shape, np.uint8), mode).save(buffer, format="PNG")
        return buffer.getvalue()

    assert decode_image(png("L", (4, 6))).shape == (1, 4, 6)
    assert decode_image(png("RGB", (4, 6, 3))).shape == (3, 4, 6)
    assert decode_image(png("L", (4, 6))).flags.writeable


def test_a_shard_changed_after_it_was_written_is_refused_naming_it(tmp_path):
    from components.common.step import IntegrityError
    from components.common.storage import sha256_file

    rels = write_shards(tmp_path)
    digests = tuple(sha256_file(tmp_path / rel) for rel in rels)
    spec = SplitSpec(str(tmp_path), tuple(rels), COUNTS, ("latent.npy",), ("cls",), "skip", "toy train", digests)
    assert len(list(source(spec, world=1).epoch(0, 0, 0))) == sum(COUNTS) // 4  # intact: read
    data = bytearray((tmp_path / rels[2]).read_bytes())
    data[600] ^= 1  # one bit, inside a sample's bytes: it would decode
    (tmp_path / rels[2]).write_bytes(bytes(data))
    src = source(spec, world=1)
    with pytest.raises(IntegrityError, match=rf"{tmp_path}/s2.tar: its sha256 is not the one its step recorded"):
        list(src.epoch(0, 0, 0))
    src.close()
