"""Captions in the shard step (components/shard/captions.py): sidecars, JSONL and CSV captions files,
webdataset re-sharding, the bad-caption policies, the cache key's inputs and the default's bytes.
Most tests run one chunk task (``shard_chunk``) in this process on real sources and real tars; one
runs the whole step on Ray."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.common.shard_reader import iter_shard_samples
from components.common.storage import Storage
from components.shard.captions import caption_plan, checked, hidden_names, sidecar_name
from components.shard.config import ShardConfig
from components.shard.digit_attributes import parse_caption
from components.shard.run import ShardError, run, shard_chunk, source_fingerprint
from components.shard.sources import open_source


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 12), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, count: int = 4) -> Path:
    """cls/im<i>.png, two classes; no captions yet."""
    for i in range(count):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"im{i}.png").write_bytes(png(40 * i))
    return root


def chunk(cfg: ShardConfig, out: Path) -> tuple[dict, dict[str, dict]]:
    """The step's one chunk task over the whole source, here: (its result, samples by source file)."""
    source = open_source(cfg.source, hidden_names(cfg))
    items, _ = source.list_items()
    result = shard_chunk(0, items, source, cfg, Storage.from_uri(str(out)), caption_plan(cfg))
    if result["error"]:
        return result, {}
    samples = iter_shard_samples(Storage.from_uri(str(out)), result["files"]["train"] + result["files"]["val"])
    return result, {json.loads(s["json"])["source"]: s for s in samples}


def test_checked_captions_and_sidecar_names():
    assert checked(b"  a cat\n", "f") == b"a cat"
    assert checked("é".encode(), "f") == "é".encode()
    assert [checked(raw, "f").kind for raw in (None, b" \n", b"\xff")] == ["missing", "empty", "not_utf8"]
    assert sidecar_name("cat/a.v2.png") == "cat/a.v2.txt" and sidecar_name("noext") == "noext.txt"
    assert sidecar_name(".png") == ".png.txt"


def test_config_refuses_unknown_captions_and_keys_its_cache_as_before():
    with pytest.raises(ValueError, match="captions: 'maybe'"):
        ShardConfig(captions="maybe")
    with pytest.raises(ValueError, match="attributes.*measures the bundled digits"):
        ShardConfig(source="/data", captions="attributes")
    with pytest.raises(ValueError, match="'sidecar' needs an image folder or webdataset source"):
        ShardConfig(captions="sidecar")
    with pytest.raises(ValueError, match="webdataset source keeps its samples' own .txt"):
        ShardConfig(source="webdataset:/shards", captions="/c.jsonl")
    default = ShardConfig().cache_relevant()
    assert "captions" not in default and "on_bad_caption" not in default
    assert ShardConfig(captions="attributes").cache_relevant()["captions"] == "attributes"
    assert ShardConfig(on_bad_caption="fail").cache_relevant()["on_bad_caption"] == "fail"


def test_default_shards_are_byte_identical_to_before_captions(tmp_path):
    """Pinned from the shard step before captions existed (commit ee2495e), same chunk and config."""
    cfg = ShardConfig(source="builtin:mnist", max_samples=40, val_fraction=0.25)
    source = open_source(cfg.source)
    result = shard_chunk(0, source.list_items()[0][:40], source, cfg, Storage.from_uri(str(tmp_path)))
    digests = {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest()
               for f in result["files"]["train"] + result["files"]["val"]}
    assert digests == {
        "train/shard-00000-000.tar": "90c7ae4c778e7f03d927031248812d5087c8410255c1e4ded7957081a1492e7e",
        "val/shard-00000-000.tar": "bdc2c2bba9838971663ab51fb58566dc49eedf28a57f44fea42eed8678a84c69"}


def test_sidecar_captions_become_txt_and_are_no_images(tmp_path):
    root = image_folder(tmp_path / "src")
    for i in range(4):
        (root / ("a" if i % 2 == 0 else "b") / f"im{i}.txt").write_text(f" caption {i} é\n", encoding="utf-8")
    result, samples = chunk(ShardConfig(source=str(root), captions="sidecar", val_fraction=0.0), tmp_path / "out")
    assert sorted(samples) == ["a/im0.png", "a/im2.png", "b/im1.png", "b/im3.png"]  # the .txt are no samples
    for name, sample in samples.items():
        assert sample["txt"].decode("utf-8") == f"caption {name[4]} é"
    assert result["skipped"] == [] and result["bad_captions"] == {}

    # Without captions the same folder's .txt files are bad images, as before.
    plain, samples = chunk(ShardConfig(source=str(root), val_fraction=0.0), tmp_path / "plain")
    assert {s["kind"] for s in plain["skipped"]} == {"not_image"} and len(plain["skipped"]) == 4
    assert all("txt" not in s for s in samples.values())


def bad_caption_folder(root: Path) -> Path:
    """im0: a good caption, im1: empty, im2: not UTF-8, im3: none."""
    image_folder(root)
    (root / "a" / "im0.txt").write_text("good")
    (root / "b" / "im1.txt").write_text("  \n")
    (root / "a" / "im2.txt").write_bytes(b"caf\xe9")
    return root


@pytest.mark.parametrize("policy", ["skip", "keep_empty", "fail"])
def test_each_policy_on_missing_empty_and_non_utf8_captions(tmp_path, policy):
    root = bad_caption_folder(tmp_path / "src")
    cfg = ShardConfig(source=str(root), captions="sidecar", on_bad_caption=policy, val_fraction=0.0)
    result, samples = chunk(cfg, tmp_path / "out")
    if policy == "fail":
        assert result["error"]["file"] == str(root / "a" / "im2.txt")  # the first bad one, in listing order
        assert result["error"]["policy"] == "on_bad_caption"
        return
    assert result["bad_captions"] == {"empty": 1, "not_utf8": 1, "missing": 1}
    if policy == "skip":
        assert list(samples) == ["a/im0.png"]
        assert sorted(s["kind"] for s in result["skipped"]) == ["caption_empty", "caption_missing", "caption_not_utf8"]
        assert {Path(s["file"]).name for s in result["skipped"]} == {"im1.txt", "im2.txt", "im3.txt"}
    else:
        assert {name: s["txt"] for name, s in samples.items()} == {
            "a/im0.png": b"good", "b/im1.png": b"", "a/im2.png": b"", "b/im3.png": b""}
        assert result["skipped"] == []


def write_captions_file(path: Path, rows: list[tuple[str, str | bytes]]) -> Path:
    if path.suffix == ".jsonl":
        lines = [json.dumps({"file": f, "caption": c}, ensure_ascii=False).encode() if isinstance(c, str)
                 else b'{"file": "' + f.encode() + b'", "caption": "' + c + b'"}' for f, c in rows]
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["file", "caption"])
        writer.writerows((f, c) for f, c in rows if isinstance(c, str))
        body = text.getvalue().encode()
        body += b"".join(f.encode() + b"," + c + b"\r\n" for f, c in rows if isinstance(c, bytes))
        path.write_bytes(body)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_captions_file_jsonl_and_csv(tmp_path, suffix):
    root = image_folder(tmp_path / "src")
    rows = [("a/im0.png", "zero, with a comma"), ("./b/im1.png", "one \"quoted\""), ("a/im2.png", b"caf\xe9"),
            ("elsewhere.png", "not in the source")]  # im3 has none
    captions = write_captions_file(root / f"captions{suffix}", rows)  # inside the source: not an image
    cfg = ShardConfig(source=str(root), captions=str(captions), val_fraction=0.0, on_bad_caption="keep_empty")
    result, samples = chunk(cfg, tmp_path / "out")
    assert sorted(samples) == ["a/im0.png", "a/im2.png", "b/im1.png", "b/im3.png"] and result["skipped"] == []
    assert samples["a/im0.png"]["txt"] == b"zero, with a comma"
    assert samples["b/im1.png"]["txt"] == b'one "quoted"'
    assert samples["a/im2.png"]["txt"] == samples["b/im3.png"]["txt"] == b""
    assert result["bad_captions"] == {"not_utf8": 1, "missing": 1}

    failing = cfg.model_copy(update={"on_bad_caption": "fail"})
    assert chunk(failing, tmp_path / "failed")[0]["error"]["file"] == f"{captions} (entry a/im2.png)"


def test_captions_file_errors_name_the_file_and_entry(tmp_path):
    root = image_folder(tmp_path / "src")
    twice = write_captions_file(tmp_path / "twice.jsonl", [("a/im0.png", "x"), ("a/im0.png", "y")])
    with pytest.raises(ShardError, match=r"twice\.jsonl: 'a/im0.png' has captions on lines 1 and 2"):
        chunk(ShardConfig(source=str(root), captions=str(twice)), tmp_path / "o1")
    (tmp_path / "header.csv").write_text("name,text\na/im0.png,x\n")
    with pytest.raises(ShardError, match=r"header\.csv: the header must name file and caption"):
        chunk(ShardConfig(source=str(root), captions=str(tmp_path / "header.csv")), tmp_path / "o2")
    (tmp_path / "broken.jsonl").write_text('{"file": "a/im0.png"}\n{not json\n')
    with pytest.raises(ShardError, match=r"broken\.jsonl line 2: not JSON"):
        chunk(ShardConfig(source=str(root), captions=str(tmp_path / "broken.jsonl")), tmp_path / "o3")
    with pytest.raises(ShardError, match=r"captions file not found: .*absent\.csv"):
        source_fingerprint(ShardConfig(source=str(root), captions=str(tmp_path / "absent.csv")))


def test_fingerprint_covers_the_captions_file_and_sidecars(tmp_path):
    import os

    root = image_folder(tmp_path / "src")
    captions = write_captions_file(tmp_path / "c.jsonl", [("a/im0.png", "x")])
    plain = source_fingerprint(ShardConfig(source=str(root)))
    with_file = source_fingerprint(ShardConfig(source=str(root), captions=str(captions)))
    assert with_file.startswith(plain + "+captions-")
    os.utime(captions, ns=(1, 1))  # a rewritten captions file: a new version
    assert source_fingerprint(ShardConfig(source=str(root), captions=str(captions))) != with_file
    (root / "a" / "im0.txt").write_text("a sidecar")  # sidecars are files of the source
    assert source_fingerprint(ShardConfig(source=str(root), captions="sidecar")) != plain


def test_resharding_keeps_captions_and_default_drops_them(tmp_path):
    root = bad_caption_folder(tmp_path / "src")
    first = ShardConfig(source=str(root), captions="sidecar", on_bad_caption="keep_empty", val_fraction=0.0)
    chunk(first, tmp_path / "first")
    again = ShardConfig(source=f"webdataset:{tmp_path / 'first'}", captions="sidecar", image_size=8,
                        on_bad_caption="keep_empty", val_fraction=0.0)
    result, samples = chunk(again, tmp_path / "again")
    assert sorted(s["txt"] for s in samples.values()) == [b"", b"", b"", b"good"]
    assert result["bad_captions"] == {"empty": 3}  # what the first step kept empty is empty now
    strict = chunk(again.model_copy(update={"on_bad_caption": "fail"}), tmp_path / "strict")[0]
    assert strict["error"]["file"].endswith(".txt") and "#" in strict["error"]["file"]
    _, plain = chunk(again.model_copy(update={"captions": "none"}), tmp_path / "plain")
    assert len(plain) == 4 and all("txt" not in s for s in plain.values())


def test_attribute_captions_name_the_class(tmp_path):
    cfg = ShardConfig(source="builtin:mnist", captions="attributes", max_samples=30, val_fraction=0.0)
    source = open_source(cfg.source)
    result = shard_chunk(0, source.list_items()[0][:30], source, cfg, Storage.from_uri(str(tmp_path)),
                         caption_plan(cfg))
    samples = list(iter_shard_samples(Storage.from_uri(str(tmp_path)), result["files"]["train"]))
    assert len(samples) == 30 and len({s["txt"] for s in samples}) > 10
    for sample in samples:
        parsed = parse_caption(sample["txt"].decode())
        assert parsed.digit == int(sample["cls"]) and parsed.thickness and parsed.slant


@pytest.mark.integration
def test_step_records_caption_facts_in_its_manifest(ray_cluster, tmp_path):
    from test_shard import make_ctx

    out = run(ShardConfig(captions="attributes", max_samples=40, items_per_task=20), {}, make_ctx(tmp_path))
    facts = out.info["caption_attributes"]
    assert sorted(facts["ink_tertiles"]) == [str(d) for d in range(10)] and facts["slant_dead_zone"] == 0.1
    assert out.info["captions"] == "attributes" and out.metrics["num_bad_captions"] == 0
    assert out.info["bad_captions_by_kind"] == {"missing": 0, "empty": 0, "not_utf8": 0}

    root = bad_caption_folder(tmp_path / "src")
    skipped = run(ShardConfig(source=str(root), captions="sidecar", val_fraction=0.0), {},
                  make_ctx(tmp_path, str(tmp_path / "skip")))
    assert skipped.info["bad_captions_by_kind"] == {"missing": 1, "empty": 1, "not_utf8": 1}
    assert skipped.metrics["num_bad_captions"] == 3 and skipped.metrics["num_train"] == 1
    assert [skipped.metrics[f"bad_captions_{kind}"] for kind in ("missing", "empty", "not_utf8")] == [1, 1, 1]
    assert skipped.info["skipped_by_kind"] == {"caption_empty": 1, "caption_missing": 1, "caption_not_utf8": 1}
    with pytest.raises(ShardError, match=r"a/im2\.txt: caption is not UTF-8.*\(on_bad_caption: fail\)"):
        run(ShardConfig(source=str(root), captions="sidecar", on_bad_caption="fail", val_fraction=0.0), {},
            make_ctx(tmp_path, str(tmp_path / "fail")))


@pytest.mark.integration
def test_s3_sidecars_and_s3_captions_file(tmp_path, s3_bucket):
    import boto3

    root = bad_caption_folder(tmp_path / "src")
    client = boto3.client("s3")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(Bucket=s3_bucket, Key=f"images/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    source = f"s3://{s3_bucket}/images"
    result, samples = chunk(ShardConfig(source=source, captions="sidecar", val_fraction=0.0), tmp_path / "sidecar")
    assert list(samples) == ["a/im0.png"] and samples["a/im0.png"]["txt"] == b"good"
    assert result["bad_captions"] == {"empty": 1, "not_utf8": 1, "missing": 1}

    captions = write_captions_file(tmp_path / "c.csv", [("a/im0.png", "from s3"), ("b/im1.png", "one")])
    client.put_object(Bucket=s3_bucket, Key="meta/c.csv", Body=captions.read_bytes())
    cfg = ShardConfig(source=source, captions=f"s3://{s3_bucket}/meta/c.csv", val_fraction=0.0)
    result, samples = chunk(cfg, tmp_path / "file")
    assert {name: s["txt"] for name, s in samples.items()} == {"a/im0.png": b"from s3", "b/im1.png": b"one"}
    assert result["bad_captions"] == {"missing": 2}  # the other two images (the .txt are bad images here)
    before = source_fingerprint(cfg)
    client.put_object(Bucket=s3_bucket, Key="meta/c.csv", Body=captions.read_bytes() + b"a/im2.png,two\r\n")
    assert source_fingerprint(cfg) != before
