"""Storage roots: the same behaviour on a local directory and on a real S3-compatible server."""

from __future__ import annotations

import hashlib

import boto3
import pytest

from components.common.storage import Storage, StorageError


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage.from_uri(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage.from_uri(f"s3://{bucket}/some/prefix")


def test_write_read_list_digest(storage, tmp_path):
    data = b"hello shards"
    digest = storage.write_bytes("a/b/one.bin", data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert storage.read_bytes("a/b/one.bin") == data
    assert storage.exists("a/b/one.bin") and not storage.exists("a/b/two.bin")
    assert storage.size("a/b/one.bin") == len(data)
    assert storage.sha256("a/b/one.bin") == digest

    local = tmp_path / "big.bin"
    local.write_bytes(b"x" * 3_000_000)
    assert storage.upload("a/c/big.bin", local) == hashlib.sha256(local.read_bytes()).hexdigest()
    storage.write_text("z.txt", "z")
    assert storage.list() == ["a/b/one.bin", "a/c/big.bin", "z.txt"]
    assert storage.list("a") == ["a/b/one.bin", "a/c/big.bin"]
    assert storage.child("a").list() == ["b/one.bin", "c/big.bin"]

    out = tmp_path / "back.bin"
    storage.download("a/c/big.bin", out)
    assert out.read_bytes() == local.read_bytes()

    storage.delete("a")
    assert storage.list() == ["z.txt"]


def test_missing_object_names_the_uri(storage):
    with pytest.raises(StorageError, match="not found") as e:
        storage.read_bytes("nope/missing.bin")
    assert "missing.bin" in str(e.value)


def test_uri_join(storage):
    assert storage.child("steps/x").uri("manifest.json") == storage.uri("steps/x/manifest.json")
    assert storage.uri("steps/x").endswith("/steps/x")


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    storage = Storage.from_uri(str(tmp_path))
    storage.write_bytes("f.bin", b"1")

    class Boom(Exception):
        pass

    def failing_fill(f):
        f.write(b"partial")
        raise Boom

    with pytest.raises(Boom):
        storage._atomic("f.bin", failing_fill)
    assert storage.read_bytes("f.bin") == b"1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_s3_digest_comes_from_metadata_and_detects_rewrites(s3_bucket):
    storage = Storage.from_uri(f"s3://{s3_bucket}/p")
    storage.write_bytes("f.bin", b"original")
    # Someone rewrites the object behind our back (no sha256 metadata): the digest is recomputed.
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/f.bin", Body=b"tampered")
    assert storage.sha256("f.bin") == hashlib.sha256(b"tampered").hexdigest()


def test_missing_bucket_is_a_clear_error(s3_server):
    storage = Storage.from_uri("s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        storage.write_bytes("a.txt", b"a")


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported storage URI scheme"):
        Storage.from_uri("gs://bucket/x")


def test_s3_storage_pickles_without_its_client(s3_bucket):
    import pickle

    storage = Storage.from_uri(f"s3://{s3_bucket}/p")
    storage.write_text("a.txt", "a")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.read_text("a.txt") == "a"
