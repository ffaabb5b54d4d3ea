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


def as_storage(source: "Manifest | Storage | str") -> Storage:
    """A step's outputs given as its manifest, its output directory (Storage) or that directory's URI."""
    if isinstance(source, str):
        return Storage.from_uri(source)
    return source if isinstance(source, Storage) else source.storage()


@dataclass
class Manifest:
    """Describes one finished step. Written last, atomically: a directory without one is not a result."""

    step: str
    cache_key: str
    code_version: str
    location: str  # URI of the step's output directory
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
        return Storage.from_uri(self.location)

    def file(self, name: str) -> FileRecord:
        for record in self.files:
            if record.path == name:
                return record
        raise KeyError(f"step {self.step!r} has no output file {name!r}")

    def files_matching(self, prefix: str = "", suffix: str = "") -> list[FileRecord]:
        return [f for f in self.files if f.path.startswith(prefix) and f.path.endswith(suffix)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        data["files"] = [FileRecord(**f) for f in data["files"]]
        return cls(**data)

    def verify(self) -> list[str]:
        """Problems with the files this manifest names (missing, wrong size, wrong digest); [] if none.
        Local roots are re-hashed; S3 objects are checked against the digest recorded at upload."""
        storage, problems = self.storage(), []
        for record in self.files:
            try:
                size = storage.size(record.path)
                if size != record.size:
                    problems.append(f"{record.path}: size {size} != {record.size}")
                elif storage.sha256(record.path) != record.sha256:
                    problems.append(f"{record.path}: sha256 mismatch")
            except (StorageError, OSError) as e:
                problems.append(f"{record.path}: {e}")
        return problems


def read_manifest(step_dir: Storage) -> Manifest | None:
    try:
        return Manifest.from_json(step_dir.read_text(MANIFEST_NAME))
    except StorageError:
        return None


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
