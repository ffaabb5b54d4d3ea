"""Captions of the shard step: one per sample, stored as ``<key>.txt`` (UTF-8, stripped of
surrounding white space), the webdataset convention. ``shard.captions`` picks where they come from:

- ``sidecar``: ``image.txt`` beside ``image.png`` in a folder source (local or S3); the ``.txt``
  files are then captions, not images, and are left out of the listing. A ``webdataset:`` source
  keeps each sample's own ``.txt``, read in the same pass over the tar as the image.
- a captions file (``.jsonl``: lines ``{"file": ..., "caption": ...}``; ``.csv``: a ``file,caption``
  header), local or ``s3://``, ``file`` relative to the source root. Memory: each task streams the
  file once and keeps only the captions of its own chunk's files (a map of at most
  ``items_per_task`` entries), so memory does not grow with the file; the price is one read of the
  file per task. A file named twice for a chunk is an error naming the captions file and the entry.
- ``attributes``: ``builtin:mnist``'s digits described by what is measured on each image
  (``digit_attributes``), against per-class ink tertiles the step computes once over the bundled set.

A caption that is missing, empty (nothing but white space) or not UTF-8 is a bad caption of that
kind; ``shard.on_bad_caption`` skips the sample, fails naming the file, or keeps it with an empty
caption. Names of files are only ever storage keys or paths opened as files: none reaches a shell
or webdataset's URL syntax.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from components.common.storage import LocalStorage
from components.shard.config import ShardConfig
from components.shard.sources import ShardError, Source, SourceItem, WebdatasetSource, storage_for

CAPTION_KEY = "txt"
BAD_CAPTION_KINDS = ("missing", "empty", "not_utf8")


@dataclass(frozen=True)
class BadCaption:
    kind: str  # one of BAD_CAPTION_KINDS
    file: str  # where the caption was looked for, for messages
    reason: str


def checked(raw: bytes | None, file: str) -> bytes | BadCaption:
    """Caption bytes as stored (UTF-8, stripped) or why they cannot be."""
    if raw is None:
        return BadCaption("missing", file, "no caption")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return BadCaption("not_utf8", file, f"caption is not UTF-8: {e}")
    if not text:
        return BadCaption("empty", file, "empty caption")
    return text.encode("utf-8")


def sidecar_name(ref: str) -> str:
    """``cat/a.png`` -> ``cat/a.txt``: the caption file beside an image."""
    folder, _, name = ref.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{folder}/{stem}.txt" if folder else f"{stem}.txt"


def split_uri(uri: str) -> tuple[str, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    return parent or ".", name


@dataclass
class CaptionPlan:
    """What a chunk task needs to caption its items; small and picklable (it travels to Ray tasks)."""

    mode: str  # "sidecar", "file" or "attributes"
    file: str | None = None  # the captions file's URI
    tertiles: dict[str, list[float]] = field(default_factory=dict)  # attributes: per-class ink tertiles

    def members(self, source: Source) -> tuple[str, ...]:
        """The files of a source's own samples the captions are: read with the images, in one pass."""
        return (CAPTION_KEY,) if self.mode == "sidecar" and isinstance(source, WebdatasetSource) else ()

    def for_chunk(self, items: list[SourceItem], source: Source) -> dict[str, bytes | BadCaption]:
        """{item key: caption bytes or BadCaption} for one chunk's items; {} where they are the
        samples' own files (``members``)."""
        if self.mode == "attributes":
            return {item.key: attribute_caption(item, self.tertiles) for item in items}
        if self.mode == "file":
            return file_captions(self.file, items)
        if self.members(source):
            return {}
        return sidecar_captions(source, items)

    def caption(self, item: SourceItem, source: Source, chunk: dict[str, bytes | BadCaption],
                extra: dict[str, bytes]) -> bytes | BadCaption:
        if self.members(source):
            return checked(extra.get(CAPTION_KEY), f"{source.storage.uri(item.ref)}#{item.member}.{CAPTION_KEY}")
        return chunk[item.key]


def caption_plan(cfg: ShardConfig) -> CaptionPlan | None:
    """The step's captions, or None (``captions: none``); the attributes' tertiles are computed here."""
    if cfg.captions == "none":
        return None
    if cfg.captions == "attributes":
        from components.shard.digit_attributes import class_tertiles
        from components.shard.sources import mnist_arrays

        pixels, labels = mnist_arrays()
        return CaptionPlan("attributes", tertiles=class_tertiles(pixels, labels))
    if cfg.captions == "sidecar":
        return CaptionPlan("sidecar")
    return CaptionPlan("file", file=cfg.captions)


@dataclass(frozen=True)
class HiddenNames:
    """Names a folder source does not list as images (picklable: the source travels to Ray tasks)."""

    suffix: str | None = None
    name: str | None = None

    def __call__(self, name: str) -> bool:
        return (self.suffix is not None and name.endswith(self.suffix)) or name == self.name


def hidden_names(cfg: ShardConfig) -> HiddenNames | None:
    """What a folder source must not list as images under these captions: the sidecar ``.txt``
    files, or the captions file when it lies inside the source folder. None: nothing."""
    if cfg.captions == "sidecar":
        return HiddenNames(suffix=".txt")
    inside = cfg.source.rstrip("/") + "/"
    if cfg.caption_file() and cfg.caption_file().startswith(inside):
        return HiddenNames(name=cfg.caption_file()[len(inside):])
    return None


def attribute_caption(item: SourceItem, tertiles: dict[str, list[float]]) -> bytes:
    from components.shard.digit_attributes import caption_for, measure

    return caption_for(item.key, measure(item.pixels, int(item.label), tertiles)).encode("utf-8")


def sidecar_captions(source: Source, items: list[SourceItem]) -> dict[str, bytes | BadCaption]:
    from components.common.storage import StorageError

    out: dict[str, bytes | BadCaption] = {}
    for item in items:
        rel = sidecar_name(item.ref)
        try:
            raw: bytes | None = source.storage.read_bytes(rel)
        except StorageError as e:
            if not e.missing:
                raise ShardError(f"cannot read caption {source.storage.uri(rel)}: {e}") from e
            raw = None
        out[item.key] = checked(raw, source.storage.uri(rel))
    return out


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """The captions file as a local path: itself, or a scratch download of an S3 object."""
    parent, name = split_uri(uri)
    storage = storage_for(parent)
    if isinstance(storage, LocalStorage):
        if not storage.path(name).is_file():
            raise ShardError(f"captions file not found: {uri}")
        yield storage.path(name)
        return
    scratch = Path(tempfile.mkdtemp(prefix="latentflow-captions-"))
    try:
        if not storage.exists(name):
            raise ShardError(f"captions file not found: {uri}")
        storage.download(name, scratch / "captions")
        yield scratch / "captions"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def caption_entries(uri: str) -> Iterator[tuple[int, str, object]]:
    """(line number, file, caption) of each entry, streamed; bytes that are not UTF-8 survive as
    surrogates, so such a caption is a bad caption of its file, not a broken captions file."""
    with local_copy(uri) as path, open(path, encoding="utf-8", errors="surrogateescape", newline="") as text:
        if uri.endswith(".csv"):
            rows = csv.DictReader(text)
            if not rows.fieldnames or not {"file", "caption"} <= set(rows.fieldnames):
                raise ShardError(f"captions file {uri}: the header must name file and caption, "
                                 f"got {rows.fieldnames}")
            for row in rows:
                yield rows.line_num, row["file"] or "", row["caption"]
            return
        for number, line in enumerate(text, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise ShardError(f"captions file {uri} line {number}: not JSON: {e}") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise ShardError(f"captions file {uri} line {number}: expected {{\"file\": ..., \"caption\": ...}}")
            yield number, entry["file"], entry.get("caption")


def file_captions(uri: str, items: list[SourceItem]) -> dict[str, bytes | BadCaption]:
    """The chunk's captions from the captions file, keeping only entries of the chunk's files."""
    wanted = {item.ref: item.key for item in items}
    raw: dict[str, bytes] = {}
    seen: dict[str, int] = {}
    for number, name, caption in caption_entries(uri):
        ref = name.removeprefix("./")
        if ref not in wanted:
            continue
        if ref in seen:
            raise ShardError(f"captions file {uri}: {name!r} has captions on lines {seen[ref]} and {number}")
        seen[ref] = number
        if isinstance(caption, str):
            raw[ref] = caption.encode("utf-8", "surrogateescape")
        elif caption is not None:  # a number or a list is no text: counted as an empty caption
            raw[ref] = b""
    return {key: checked(raw.get(ref), f"{uri} (entry {ref})") for ref, key in wanted.items()}


def caption_fingerprint(uri: str) -> list:
    """The captions file's path, size and version (mtime locally, ETag on S3), for the cache key."""
    parent, name = split_uri(uri)
    versions = [v for v in storage_for(parent).list_versions(name) if v[0] == name]
    if not versions:
        raise ShardError(f"captions file not found: {uri}")
    return [list(v) for v in versions]

