"""A small durable DAG runner on Ray Core (``ray.workflow`` was removed from Ray after 2.47).

Semantics:
- a step runs as a Ray task with the resources its config declares; steps whose inputs are ready
  run concurrently;
- a step's outputs live under ``<root>/steps/<step>/<cache key>/`` and are described by
  ``manifest.json``, written last and atomically: a directory without a manifest is not a result;
- cache key = sha256(step name, code version, canonical config, upstream manifest digests, and for
  a step that reads an outside source its fingerprint), so a config change, or new data in the
  source, re-runs that step and everything downstream, and nothing upstream;
- a manifest whose files fail verification is treated as missing: the step re-runs;
- re-running (same or new workflow id) serves every verified step from cache.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from components.common.config import StepConfig
from components.common.step import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    StepContext,
    StepOutput,
    canonical_json,
    read_manifest,
)
from components.common.storage import Storage
from components.common.tracking import StepTracker

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


def step_dir(root: Storage, name: str, key: str) -> Storage:
    return root.child(f"steps/{name}/{key}")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def find_cached(root: Storage, s: Step, key: str) -> tuple[Manifest | None, str | None]:
    """(verified manifest, None) or (None, why the cache could not be used: None if simply absent)."""
    manifest = read_manifest(step_dir(root, s.name, key))
    if manifest is None:
        return None, None
    problems = manifest.verify()
    if problems:
        return None, "manifest present but outputs fail verification: " + "; ".join(problems[:3])
    return manifest, None


def execute_step(s: Step, key: str, inputs: dict[str, Manifest], ctx: StepContext,
                 upstream: dict[str, str], commit: str | None) -> Manifest:
    """Body of the Ray task: run the stage, hash its outputs, write the manifest last."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = now_iso()
    try:
        result = s.entry(s.config, inputs, ctx)
    finally:
        ctx.remove_scratch()
    if not isinstance(result, StepOutput):
        raise TypeError(f"step {s.name!r} returned {type(result).__name__}, expected StepOutput")
    files = [FileRecord(path, ctx.output.sha256(path), ctx.output.size(path)) for path in sorted(result.files)]
    manifest = Manifest(
        step=s.name, cache_key=key, code_version=s.code_version, location=ctx.output.uri(),
        config=s.config.model_dump(mode="json"), upstream=upstream, files=files,
        metrics={k: float(v) for k, v in result.metrics.items()}, info=result.info,
        mlflow_run_id=ctx.tracker.run_id, workflow_id=ctx.workflow_id,
        started_at=started, ended_at=now_iso(), git_commit=commit,
    )
    ctx.output.write_text(MANIFEST_NAME, manifest.to_json())
    return manifest


@dataclass
class StepRecord:
    name: str
    status: str  # ran | cached | failed | skipped | would_run
    cache_key: str | None = None
    duration_s: float = 0.0
    manifest_uri: str | None = None
    mlflow_run_id: str | None = None
    error: str | None = None
    note: str | None = None


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
        manifest, why = find_cached(root, s, key)
        if manifest is not None:
            digests[s.name] = manifest.digest
            records.append(StepRecord(s.name, "cached", key, manifest_uri=manifest.uri(MANIFEST_NAME),
                                      mlflow_run_id=manifest.mlflow_run_id))
        else:
            records.append(StepRecord(s.name, "would_run", key, note=why))
    return records


class WorkflowRunner:
    """Runs a Workflow on Ray with MLflow runs (via ``tracking``, a pipelines.tracking.RunTracker)."""

    def __init__(self, workflow: Workflow, root: Storage, workflow_id: str, tracking,
                 on_event: Callable[[str, StepRecord], None] | None = None,
                 ensure_ray: Callable[[], None] | None = None):
        self.workflow = workflow
        self.root = root
        self.workflow_id = workflow_id
        self.tracking = tracking
        self.on_event = on_event or (lambda event, record: None)
        self.ensure_ray = ensure_ray or (lambda: None)
        self.commit = git_commit()

    def run(self) -> WorkflowResult:
        import ray

        result = WorkflowResult(self.workflow_id)
        result.parent_run_id = self.tracking.start_parent(self.workflow_id)
        manifests: dict[str, Manifest] = {}
        records = {s.name: StepRecord(s.name, "pending") for s in self.workflow.steps}
        result.steps = list(records.values())
        running: dict = {}  # ObjectRef -> (step, record, start time)
        blocked: set[str] = set()

        def launch_ready():
            for s in self.workflow.steps:
                rec = records[s.name]
                if rec.status != "pending" or any(i not in manifests for i in s.inputs):
                    continue
                upstream = {i: manifests[i].digest for i in s.inputs}
                key = rec.cache_key = cache_key(s, upstream)
                manifest, why = find_cached(self.root, s, key)
                if why:
                    log.warning("step %s: %s; re-running", s.name, why)
                    rec.note = "cache invalid: re-ran"
                if manifest is not None:
                    manifests[s.name] = manifest
                    rec.status, rec.manifest_uri = "cached", manifest.uri(MANIFEST_NAME)
                    rec.mlflow_run_id = self.tracking.cached_step(s, manifest, manifests)
                    self.on_event("cached", rec)
                    return launch_ready()  # its dependents may now be ready
                self.ensure_ray()
                run_id = self.tracking.start_step(s, key, upstream_runs(s, manifests))
                rec.mlflow_run_id = run_id
                out = step_dir(self.root, s.name, key)
                ctx = StepContext(s.name, self.workflow_id, key, self.root, out, s.config.resources,
                                  StepTracker(self.tracking.uri, run_id))
                inputs = {i: manifests[i] for i in s.inputs}
                ref = remote_for(s).remote(s, key, inputs, ctx, upstream, self.commit)
                running[ref] = (s, rec, time.monotonic())
                rec.status = "running"
                self.on_event("start", rec)

        try:
            launch_ready()
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                s, rec, t0 = running.pop(ready[0])
                rec.duration_s = round(time.monotonic() - t0, 2)
                try:
                    manifest = ray.get(ready[0])
                except Exception as e:  # a failed step keeps the rest of the workflow's results
                    rec.status, rec.error = "failed", describe_failure(e)
                    self.tracking.end_step(rec.mlflow_run_id, None, failed=True, error=rec.error)
                    blocked |= self.workflow.downstream_of(s.name)
                    self.on_event("failed", rec)
                    continue
                manifests[s.name] = manifest
                rec.status, rec.manifest_uri = "ran", manifest.uri(MANIFEST_NAME)
                self.tracking.end_step(rec.mlflow_run_id, manifest)
                self.on_event("ran", rec)
                launch_ready()
        finally:
            for rec in records.values():
                if rec.status in ("pending", "running"):
                    rec.status = "skipped" if rec.name in blocked or rec.status == "pending" else "failed"
            self.tracking.end_parent(result)
        return result


def upstream_runs(s: Step, manifests: dict[str, Manifest]) -> dict[str, str | None]:
    return {i: manifests[i].mlflow_run_id for i in s.inputs}


def describe_failure(error: Exception) -> str:
    """The innermost error of a Ray task failure, one line, plus the task's traceback tail."""
    cause = getattr(error, "cause", None) or error
    text = f"{type(cause).__name__}: {cause}".strip()
    first_line = text.splitlines()[0] if text else type(cause).__name__
    if len(first_line) > 400:
        first_line = first_line[:400] + "..."
    return first_line


def remote_for(s: Step):
    """The step's Ray task, with the resources its config declares."""
    import ray

    res = s.config.resources
    options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_retries": res.max_retries,
               "retry_exceptions": res.max_retries > 0, "name": f"step:{s.name}"}
    if res.memory_gb:
        options["memory"] = int(res.memory_gb * 2**30)
    return ray.remote(execute_step).options(**options)

