"""The stage contract: what a step receives (its upstream manifests and a StepContext) and what it
returns (a StepOutput that the runner turns into its manifest).

A stage never looks at the pipeline around it; everything it may touch comes through ``ctx``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.common.config import StepResources
from components.common.storage import Storage, StorageError
from components.common.tracking import StepTracker

MANIFEST_NAME = "manifest.json"
CHECKPOINT_DIR = "_checkpoints"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass
class FileRecord:
    path: str  # relative to the step's output directory
    sha256: str
    size: int


class IntegrityError(RuntimeError):
    """A step's output file is not what its manifest recorded; the message names the file."""


class ManifestInvalid(ValueError):
    """A manifest.json that is there but is not a manifest (truncated, foreign, hand-edited)."""


def as_storage(source: "Manifest | Storage | str") -> Storage:
    """A step's outputs given as its manifest, its output directory (Storage) or that directory's URI."""
    if isinstance(source, str):
        return Storage.from_uri(source)
    return source if isinstance(source, Storage) else source.storage()


@dataclass(frozen=True)
class FileRef:
    """One output file of a step by its directory URI, name and the sha256 its manifest recorded:
    small and picklable, what a worker reads weights through (a warm start, a teacher); verified."""

    directory: str
    name: str
    sha256: str

    @classmethod
    def of(cls, manifest: "Manifest", name: str) -> "FileRef":
        return cls(manifest.output_uri, name, manifest.file(name).sha256)

    def read(self) -> bytes:
        data = Storage.from_uri(self.directory).read_bytes(self.name)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise IntegrityError(f"{self.directory}/{self.name}: its sha256 is not the one recorded when it "
                                 "was written: the file was changed; restore it or re-run the step that wrote it")
        return data


def read_output(source: "Manifest | Storage | str", name: str) -> bytes:
    """The bytes of a step's output file. From a manifest they are checked against its sha256
    (``IntegrityError`` naming the file when they differ); a Storage or URI is a step's own fresh
    output (nothing recorded yet to check against)."""
    if isinstance(source, Manifest):
        return source.read_verified(name)
    return as_storage(source).read_bytes(name)


@dataclass
class Manifest:
    """Describes one finished step. Written last, atomically: a directory without one is not a result."""

    step: str
    cache_key: str
    code_version: str
    # The step's output directory, relative to the storage root ("steps/<step>/<key>"), so that a
    # root copied or moved elsewhere stays valid; manifests from before held an absolute URI.
    location: str
    config: dict[str, Any]
    upstream: dict[str, str]  # upstream step name -> its manifest digest
    files: list[FileRecord]
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    workflow_id: str = ""
    started_at: str = ""
    ended_at: str = ""
    git_commit: str | None = None
    root: str = field(default="", repr=False, compare=False)  # the root it was read from; not saved

    @property
    def digest(self) -> str:
        """What downstream cache keys depend on: which step/config produced which exact bytes.
        Times and run ids are left out, so a bit-identical re-run does not invalidate downstream."""
        content = {"step": self.step, "cache_key": self.cache_key,
                   "files": [asdict(f) for f in self.files]}
        return hashlib.sha256(canonical_json(content).encode()).hexdigest()

    def uri(self, name: str) -> str:
        return self.storage().uri(name)

    def storage(self) -> Storage:
        if "://" in self.location or self.location.startswith("/") or not self.root:
            return Storage.from_uri(self.location)  # an absolute location (older manifests, tests)
        return Storage.from_uri(self.root).child(self.location)

    @property
    def output_uri(self) -> str:
        """The output directory's URI (``location`` resolved against the root)."""
        return self.storage().uri()

    def read_verified(self, name: str) -> bytes:
        """An output file's bytes, checked against the sha256 this manifest recorded at write time."""
        record = self.file(name)
        data = self.storage().read_bytes(name)
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise IntegrityError(f"{self.uri(name)}: its sha256 is not the one step {self.step!r} recorded "
                                 f"({len(data)} bytes, {record.size} recorded): the file was changed after "
                                 "it was written; re-run the step (delete its manifest) or restore the file")
        return data

    def file(self, name: str) -> FileRecord:
        for record in self.files:
            if record.path == name:
                return record
        raise KeyError(f"step {self.step!r} has no output file {name!r}")

    def files_matching(self, prefix: str = "", suffix: str = "") -> list[FileRecord]:
        return [f for f in self.files if f.path.startswith(prefix) and f.path.endswith(suffix)]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("root")
        return json.dumps(data, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, root: str = "") -> "Manifest":
        """Parse a manifest; ``ManifestInvalid`` (naming what is wrong) if it is not one."""
        try:
            data = json.loads(text)
            data["files"] = [FileRecord(**f) for f in data["files"]]
            data.pop("root", None)
            return cls(**data, root=root)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ManifestInvalid(f"not a latentflow manifest ({type(e).__name__}: {str(e)[:200]})") from e

    def verify(self) -> list[str]:
        """Problems with the files this manifest names (missing, wrong size, wrong digest); [] if none.
        Local roots are re-hashed; S3 objects are checked against the digest recorded at upload.
        A storage error other than "not found" is raised, not reported: it says nothing about the files."""
        storage, problems = self.storage(), []
        for record in self.files:
            try:
                size = storage.size(record.path)
                if size != record.size:
                    problems.append(f"{record.path}: size {size} != {record.size}")
                elif storage.sha256(record.path) != record.sha256:
                    problems.append(f"{record.path}: sha256 mismatch")
            except StorageError as e:
                if not e.missing:
                    raise
                problems.append(f"{record.path}: missing")
        return problems


def read_manifest(root: Storage, location: str) -> Manifest | None:
    """The manifest of the step directory ``location`` (relative to ``root``): None only when there
    is none. A storage error that is not "not found" propagates (``StorageError``), and a file that
    is not a manifest raises ``ManifestInvalid``: neither may be read as "no result"."""
    try:
        text = root.child(location).read_text(MANIFEST_NAME)
    except StorageError as e:
        if e.missing:
            return None
        raise
    return Manifest.from_json(text, root=root.uri())


def read_manifest_at(uri: str) -> Manifest:
    """A manifest from its URI, ``<root>/steps/<step>/<key>/manifest.json``, resolved against that root."""
    directory = uri.rsplit("/", 1)[0]
    root, sep, _ = directory.rpartition("/steps/")
    storage = Storage.from_uri(directory)
    manifest = Manifest.from_json(storage.read_text(MANIFEST_NAME), root=root if sep else "")
    if not sep and "://" not in manifest.location and not manifest.location.startswith("/"):
        raise ManifestInvalid(f"{uri}: a relative manifest outside a storage root's steps/ folder")
    return manifest


@dataclass
class StepOutput:
    """What a stage's entry function returns: the files it wrote under ``ctx.output`` (relative
    paths), scalar metrics, and any stage-specific facts worth keeping in the manifest."""

    files: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    step: str
    workflow_id: str
    cache_key: str
    root: Storage  # the pipeline's storage root
    output: Storage  # this step's output directory (root/steps/<step>/<cache key>)
    resources: StepResources
    tracker: StepTracker
    scratch_dirs: list[Path] = field(default_factory=list)  # removed by the runner when the step ends

    @property
    def checkpoint_uri(self) -> str:
        """Where a learned stage keeps its checkpoints; the same across re-runs of one cache key,
        so an interrupted step resumes instead of starting over."""
        return self.output.uri(CHECKPOINT_DIR)

    def scratch_dir(self) -> Path:
        """A fresh local directory for staging files before they are written to ``output``; on the
        machine that calls it (a Ray task of the step makes its own), removed when the step ends."""
        path = Path(tempfile.mkdtemp(prefix=f"latentflow-{self.step}-"))
        self.scratch_dirs.append(path)
        return path

    def remove_scratch(self) -> None:
        for path in self.scratch_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.scratch_dirs.clear()
