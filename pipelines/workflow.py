"""A small durable DAG runner on Ray Core (``ray.workflow`` was removed from Ray after 2.47).

Semantics:
- a step runs as a Ray task with the resources its config declares; steps whose inputs are ready
  run concurrently;
- a step's outputs live under ``<root>/steps/<step>/<cache key>/`` and are described by
  ``manifest.json``, written last and atomically: a directory without a manifest is not a result;
- cache key = sha256(step name, code version, canonical config, upstream manifest digests, and for
  a step that reads an outside source its fingerprint), so a config change, or new data in the
  source, re-runs that step and everything downstream, and nothing upstream;
- a manifest whose files fail verification, or that is not a manifest, is an invalid result: the
  step re-runs, with a note; one that cannot be read (an outage, denied access) stops the run,
  naming the object: a storage error is never read as "no result" (``pipelines.step_task``);
- manifests name their directory relative to the root, so a root copied or moved stays a cache;
- one writer per step: a step's task holds a lease on its directory while it runs; another run of
  the same step waits for its result (``components.common.lease``);
- re-running (same or new workflow id) serves every verified step from cache.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from components.common.config import StepConfig
from components.common.lease import current_holder
from components.common.step import MANIFEST_NAME, Manifest, StepContext, StepOutput, canonical_json
from components.common.storage import Storage
from pipelines.step_task import find_cached, step_dir, step_location

log = logging.getLogger("latentflow.workflow")

StageEntry = Callable[[StepConfig, dict[str, Manifest], StepContext], StepOutput]


@dataclass(frozen=True)
class Step:
    name: str
    entry: StageEntry
    config: StepConfig
    inputs: tuple[str, ...] = ()
    code_version: str = "1"
    # () -> what the step's outside source holds now (e.g. a listing digest); None: no outside source
    fingerprint: Callable[[], str] | None = None


class SourceFingerprint:
    """A step's ``source_fingerprint(config)``, taken once and remembered (one listing of the source
    per run, however often the cache key is asked for); picklable, as Steps travel to Ray tasks."""

    def __init__(self, probe: Callable, config: StepConfig):
        self.probe, self.config, self.value = probe, config, None

    def __call__(self) -> str:
        if self.value is None:
            self.value = str(self.probe(self.config))
        return self.value


def step(name: str, entry: StageEntry, config: StepConfig, inputs: tuple[str, ...] = ()) -> Step:
    """Declare a step; its code version is the ``CODE_VERSION`` of the stage's module (bump it when
    a code change alters what the stage writes, so cached results are not reused). A stage module
    with ``source_fingerprint(config) -> str`` reads an outside source: its fingerprint, taken once
    per process, enters the cache key."""
    module = sys.modules[entry.__module__]
    version = getattr(module, "CODE_VERSION", "1")
    probe = getattr(module, "source_fingerprint", None)
    fingerprint = SourceFingerprint(probe, config) if callable(probe) else None
    return Step(name, entry, config, tuple(inputs), str(version), fingerprint)


@dataclass
class Workflow:
    name: str
    steps: list[Step]

    def __post_init__(self):
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate step names in workflow {self.name!r}: {names}")
        done: set[str] = set()
        for s in self.steps:  # declaration order must already be a topological order
            missing = [i for i in s.inputs if i not in done]
            if missing:
                raise ValueError(f"step {s.name!r} depends on {missing}, which are not declared before it")
            done.add(s.name)

    def restricted_to(self, names: list[str]) -> "Workflow":
        """The named steps and every step they need, in declaration order (``run --only``)."""
        by_name = {s.name: s for s in self.steps}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"no step named {', '.join(map(repr, unknown))} in workflow {self.name!r}; its steps: "
                             f"{', '.join(by_name)}")
        wanted, pending = set(), list(names)
        while pending:
            name = pending.pop()
            if name not in wanted:
                wanted.add(name)
                pending.extend(by_name[name].inputs)
        return Workflow(self.name, [s for s in self.steps if s.name in wanted])

    def downstream_of(self, name: str) -> set[str]:
        out = {name}
        for s in self.steps:
            if any(i in out for i in s.inputs):
                out.add(s.name)
        return out - {name}


def cache_key(s: Step, upstream: dict[str, str]) -> str:
    material = {"step": s.name, "code_version": s.code_version,
                "config": s.config.cache_relevant(), "upstream": dict(sorted(upstream.items()))}
    if s.fingerprint is not None:
        try:
            material["source"] = s.fingerprint()
        except Exception as e:  # noqa: BLE001 - the step itself will fail with its own, clearer error
            log.warning("step %s: cannot fingerprint its source (%s); it will run", s.name, e)
            material["source"] = f"unavailable: {type(e).__name__}"
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class StepRecord:
    name: str
    status: str  # ran | cached | failed | skipped | would_run
    cache_key: str | None = None
    duration_s: float = 0.0
    manifest_uri: str | None = None
    manifest_path: str | None = None  # relative to the storage root: valid wherever the root moves
    mlflow_run_id: str | None = None
    error: str | None = None
    note: str | None = None
    attempts: int | None = 0  # times its task started in this workflow (retries after a process or node died)

    def found(self, status: str, manifest: Manifest) -> None:
        self.status, self.manifest_uri = status, manifest.uri(MANIFEST_NAME)
        self.manifest_path = f"{step_location(manifest.step, manifest.cache_key)}/{MANIFEST_NAME}"


@dataclass
class WorkflowResult:
    workflow_id: str
    steps: list[StepRecord] = field(default_factory=list)
    parent_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.status in ("ran", "cached") for r in self.steps)

    def record(self, name: str) -> StepRecord:
        return next(r for r in self.steps if r.name == name)


def plan(workflow: Workflow, root: Storage) -> list[StepRecord]:
    """What ``run`` would do, without running anything: cached steps and their keys, the rest
    ``would_run`` (a step downstream of one that runs must run too; its key is not known yet)."""
    digests: dict[str, str] = {}
    records = []
    for s in workflow.steps:
        if not all(i in digests for i in s.inputs):
            records.append(StepRecord(s.name, "would_run", note="after upstream runs"))
            continue
        key = cache_key(s, {i: digests[i] for i in s.inputs})
        manifest, why = find_cached(root, s.name, key)
        record = StepRecord(s.name, "would_run", key, note=why)
        if manifest is not None:
            digests[s.name] = manifest.digest
            record.found("cached", manifest)
            record.mlflow_run_id = manifest.mlflow_run_id
        elif (holder := current_holder(step_dir(root, s.name, key))) is not None:
            record.note = f"running now in {holder.describe()}: this run would wait for its result"
        records.append(record)
    return records
