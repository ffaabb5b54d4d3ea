"""Storage roots: a local directory or ``s3://bucket/prefix``, behind one small interface.

Every write is atomic: local files go to a temporary name in the same directory and are renamed;
S3 objects are written with one PUT (an object is never visible half-written). The sha256 of every
object written is recorded (S3: object metadata ``sha256``) so manifests can be verified cheaply.

Credentials, endpoint and region come from the standard AWS environment and config files
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``~/.aws/config`` ...), never from pipeline YAML.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

from components.common.s3_access import s3_client
from components.common.storage_errors import StorageError, s3_storage_error

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Storage(ABC):
    """A root URI; every path argument is relative to it, with '/' separators."""

    uri_root: str

    @staticmethod
    def from_uri(uri: str) -> "Storage":
        if uri.startswith("s3://"):
            return S3Storage(uri)
        if "://" in uri and not uri.startswith("file://"):
            raise StorageError(f"unsupported storage URI scheme: {uri!r} (use a local path or s3://)")
        return LocalStorage(uri.removeprefix("file://"))

    def uri(self, rel: str = "") -> str:
        return f"{self.uri_root.rstrip('/')}/{rel.strip('/')}" if rel.strip("/") else self.uri_root

    def child(self, rel: str) -> "Storage":
        return Storage.from_uri(self.uri(rel))

    @property
    def is_local(self) -> bool:
        return isinstance(self, LocalStorage)

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write atomically; return the sha256 of the data."""

    @abstractmethod
    def upload(self, rel: str, local_path: str | os.PathLike) -> str:
        """Copy a local file in atomically; return its sha256."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    @abstractmethod
    def download(self, rel: str, local_path: str | os.PathLike) -> None: ...

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def size(self, rel: str) -> int: ...

    @abstractmethod
    def sha256(self, rel: str) -> str:
        """The content digest: recomputed locally; on S3 the recorded metadata, else recomputed."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of every object under prefix, sorted."""

    @abstractmethod
    def list_versions(self, prefix: str = "") -> list[tuple[str, int, str]]:
        """(relative path, size, version) of every object under prefix, sorted: the version is the
        modification time in ns locally and the ETag on S3, so a changed object changes it."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Remove one object or everything under a prefix."""

    # Conditional writes, for leases (components/common/lease.py): of two writers, exactly one wins.

    @abstractmethod
    def create_exclusive(self, rel: str, data: bytes) -> str | None:
        """Write ``data`` only if nothing is at ``rel``: the new object's version, or None when
        something already is (O_EXCL-style locally, ``If-None-Match: *`` on S3)."""

    @abstractmethod
    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        """(the object's bytes, its version) for a later ``replace_if``."""

    @abstractmethod
    def replace_if(self, rel: str, data: bytes, version: str) -> str | None:
        """Overwrite only if the object is still at ``version``: the new version, or None
        (``If-Match`` on S3; locally under a lock on a sidecar file)."""

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri_root = str(self.root)

    def path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def _atomic(self, rel: str, fill) -> str:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha256_file(target)

    def write_bytes(self, rel: str, data: bytes) -> str:
        return self._atomic(rel, lambda f: f.write(data))

    def upload(self, rel: str, local_path) -> str:
        if Path(local_path).absolute() == self.path(rel):
            return sha256_file(local_path)
        with open(local_path, "rb") as src:
            return self._atomic(rel, lambda f: shutil.copyfileobj(src, f, CHUNK))

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.path(rel).read_bytes()
        except FileNotFoundError as e:
            raise StorageError(f"not found: {self.path(rel)}", missing=True) from e
        except OSError as e:  # denied, a directory, an I/O error: cannot tell, never "absent"
            raise StorageError(f"read {self.path(rel)}: {e.strerror or e}") from e

    def download(self, rel: str, local_path) -> None:
        try:
            shutil.copyfile(self.path(rel), local_path)
        except FileNotFoundError as e:
            raise StorageError(f"not found: {self.path(rel)}", missing=True) from e

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def size(self, rel: str) -> int:
        return self._local("stat", rel, lambda: self.path(rel).stat().st_size)

    def sha256(self, rel: str) -> str:
        return self._local("read", rel, lambda: sha256_file(self.path(rel)))

    def _local(self, what: str, rel: str, fn):
        try:
            return fn()
        except FileNotFoundError as e:
            raise StorageError(f"not found: {self.path(rel)}", missing=True) from e
        except OSError as e:
            raise StorageError(f"{what} {self.path(rel)}: {e.strerror or e}") from e

    def list(self, prefix: str = "") -> list[str]:
        base = self.path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")
        )

    def list_versions(self, prefix: str = "") -> list[tuple[str, int, str]]:
        out = []
        for rel in self.list(prefix):
            stat = self.path(rel).stat()
            out.append((rel, stat.st_size, str(stat.st_mtime_ns)))
        return out

    def delete(self, prefix: str) -> None:
        target = self.path(prefix)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def _version(self, rel: str) -> str:
        stat = self._local("stat", rel, lambda: self.path(rel).stat())
        return f"{stat.st_ino}:{stat.st_mtime_ns}"  # a replace is a new inode: a new version

    def create_exclusive(self, rel: str, data: bytes) -> str | None:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, target)  # atomic, fails if the target exists, and never shows it half-written
        except FileExistsError:
            return None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return self._version(rel)

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        version = self._version(rel)
        return self.read_bytes(rel), version

    def replace_if(self, rel: str, data: bytes, version: str) -> str | None:
        import fcntl

        lock_path = self.path(rel).with_name(f".{self.path(rel).name}.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # every replace_if of this object takes it
            try:
                if self._version(rel) != version:
                    return None
            except StorageError as e:
                if e.missing:
                    return None
                raise
            self.write_bytes(rel, data)
            return self._version(rel)


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"S3 URI without a bucket: {uri!r}")
    return bucket, key.strip("/")


class S3Storage(Storage):
    def __init__(self, uri: str):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri_root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def __getstate__(self):  # boto3 clients don't pickle; Ray ships Storage objects to tasks
        return {**self.__dict__, "_client": None}

    def key(self, rel: str) -> str:
        return join(self.prefix, rel)

    def object_uri(self, rel: str) -> str:
        """The object's full URI, as errors name it."""
        return f"s3://{self.bucket}/{self.key(rel)}"

    def _call(self, what: str, rel: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - mapped to a StorageError naming the object, or re-raised
            raise s3_storage_error(what, self.object_uri(rel), self.bucket, e) from e

    def write_bytes(self, rel: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self._call("write", rel, self.client.put_object, Bucket=self.bucket, Key=self.key(rel),
                   Body=data, Metadata={"sha256": digest})
        return digest

    def upload(self, rel: str, local_path) -> str:
        # One PUT for any size we write (shards, weights): never a half-visible object. Files over
        # 5 GiB would need multipart, which S3 also only exposes once completed.
        digest = sha256_file(local_path)
        extra = {"Metadata": {"sha256": digest}}
        self._call("upload", rel, self.client.upload_file, str(local_path), self.bucket,
                   self.key(rel), ExtraArgs=extra)
        return digest

    def read_bytes(self, rel: str) -> bytes:
        # the body is read inside _call: a connection cut mid-body is a (transient) StorageError too
        return self._call("read", rel, lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read())

    def download(self, rel: str, local_path) -> None:
        self._call("download", rel, self.client.download_file, self.bucket, self.key(rel), str(local_path))

    def _head(self, rel: str) -> dict:
        return self._call("stat", rel, self.client.head_object, Bucket=self.bucket, Key=self.key(rel))

    def exists(self, rel: str) -> bool:
        try:
            self._head(rel)
            return True
        except StorageError as e:
            if e.missing:
                return False
            raise

    def size(self, rel: str) -> int:
        return int(self._head(rel)["ContentLength"])

    def sha256(self, rel: str) -> str:
        recorded = self._head(rel).get("Metadata", {}).get("sha256")
        if recorded:
            return recorded
        digest = hashlib.sha256()
        body = self._call("read", rel, self.client.get_object, Bucket=self.bucket, Key=self.key(rel))["Body"]
        for block in iter(lambda: body.read(CHUNK), b""):
            digest.update(block)
        return digest.hexdigest()

    def iter_objects(self, prefix: str = "") -> Iterator[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self.key(prefix)
        full = full + "/" if full and not full.endswith("/") and not self.exists(prefix) else full
        pages = self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        for page in pages:
            yield from page.get("Contents", [])

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(obj["Key"][strip:] for obj in self.iter_objects(prefix))

    def list_versions(self, prefix: str = "") -> list[tuple[str, int, str]]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted((obj["Key"][strip:], int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
                      for obj in self.iter_objects(prefix))

    def create_exclusive(self, rel: str, data: bytes) -> str | None:
        return self._conditional_put(rel, data, IfNoneMatch="*")

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        def get():
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
            return response["Body"].read(), response["ETag"]

        return self._call("read", rel, get)

    def replace_if(self, rel: str, data: bytes, version: str) -> str | None:
        try:
            return self._conditional_put(rel, data, IfMatch=version)
        except StorageError as e:
            if e.missing:
                return None
            raise

    def _conditional_put(self, rel: str, data: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        digest = hashlib.sha256(data).hexdigest()
        try:
            response = self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data,
                                              Metadata={"sha256": digest}, **condition)
        except ClientError as e:  # lost the race: the condition did not hold, or a concurrent write won
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return None
            raise s3_storage_error("write", self.object_uri(rel), self.bucket, e) from e
        except Exception as e:  # noqa: BLE001 - the same mapping to StorageError as every other call
            raise s3_storage_error("write", self.object_uri(rel), self.bucket, e) from e
        return response["ETag"]

    def delete(self, prefix: str) -> None:
        for rel in self.list(prefix):
            self._call("delete", rel, self.client.delete_object, Bucket=self.bucket, Key=self.key(rel))
