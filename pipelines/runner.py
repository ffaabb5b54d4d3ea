"""``WorkflowRunner``: runs a Workflow on Ray, steps concurrently as their inputs become ready, with
an MLflow parent run and a nested run per step (``tracking``, a ``pipelines.workflow_tracking.RunTracker``).

``on_event(event, record)`` is called as each step starts, ends, comes from cache or fails
(``pipelines.runtime`` writes summary.json from it, so a killed driver leaves a record). When
``stop_requested()`` names a signal (SIGTERM or SIGINT, see ``pipelines.runtime``), the runner ends
the steps still running as ``killed``, their MLflow runs and the parent as KILLED, and raises
``WorkflowInterrupted``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from components.common.progress import ProgressChannel
from components.common.step import Manifest, StepContext
from components.common.storage import Storage
from components.common.tracking import StepTracker
from pipelines.step_task import attempts, find_cached, remote_for, step_dir
from pipelines.workflow import Step, StepRecord, Workflow, WorkflowResult, cache_key, git_commit

log = logging.getLogger("latentflow.workflow")


class WorkflowInterrupted(BaseException):
    """The driver got SIGTERM or SIGINT (a BaseException, like KeyboardInterrupt: no step's error)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class WorkflowRunner:
    def __init__(self, workflow: Workflow, root: Storage, workflow_id: str, tracking,
                 on_event: Callable[[str, StepRecord], None] | None = None,
                 ensure_ray: Callable[[], None] | None = None,
                 stop_requested: Callable[[], str | None] | None = None):
        self.workflow, self.root, self.workflow_id, self.tracking = workflow, root, workflow_id, tracking
        self.on_event = on_event or (lambda event, record: None)
        self.ensure_ray = ensure_ray or (lambda: None)
        self.stop_requested = stop_requested or (lambda: None)  # the name of a signal the driver got
        self.commit = git_commit()
        self.result = WorkflowResult(workflow_id)
        self.records = {s.name: StepRecord(s.name, "pending") for s in workflow.steps}
        self.result.steps = list(self.records.values())
        self.manifests: dict[str, Manifest] = {}
        self.running: dict = {}  # ObjectRef -> (step, record, start time)
        self.blocked: set[str] = set()

    def run(self) -> WorkflowResult:
        import ray

        self.result.parent_run_id = self.tracking.start_parent(self.workflow_id)
        interrupted = None
        try:
            self._launch_ready()
            while self.running:
                # a timeout, so that a stop the driver was asked for is seen within a second
                ready, _ = ray.wait(list(self.running), num_returns=1, timeout=1.0)
                if (signal_name := self.stop_requested()) is not None:
                    raise WorkflowInterrupted(signal_name)
                if ready:
                    self._collect(ready[0])
                    self._launch_ready()
        except WorkflowInterrupted as e:
            interrupted = e
            raise
        finally:
            self._finish(interrupted)
        return self.result

    def _launch_ready(self) -> None:
        """Serve from cache or start every pending step whose inputs are all there."""
        progress = True
        while progress:
            progress = False
            for s in self.workflow.steps:
                rec = self.records[s.name]
                if rec.status == "pending" and all(i in self.manifests for i in s.inputs):
                    progress |= self._start(s, rec)

    def _start(self, s: Step, rec: StepRecord) -> bool:
        """True when the step came from cache (its dependents may now be ready)."""
        upstream = {i: self.manifests[i].digest for i in s.inputs}
        key = rec.cache_key = cache_key(s, upstream)
        manifest, why = find_cached(self.root, s.name, key)
        if why:
            log.warning("step %s: %s; re-running", s.name, why)
            rec.note = f"cache invalid, re-ran: {why}"
        if manifest is not None:
            self.manifests[s.name] = manifest
            rec.found("cached", manifest)
            rec.mlflow_run_id = self.tracking.cached_step(s, manifest, self.manifests)
            self.on_event("cached", rec)
            return True
        self.ensure_ray()
        rec.mlflow_run_id = self.tracking.start_step(s, key, upstream_runs(s, self.manifests), self.manifests)
        ctx = StepContext(s.name, self.workflow_id, key, self.root, step_dir(self.root, s.name, key),
                          s.config.resources,
                          StepTracker(self.tracking.uri, rec.mlflow_run_id, ProgressChannel(self.workflow_id, s.name)))
        inputs = {i: self.manifests[i] for i in s.inputs}
        ref = remote_for(s).remote(s, key, inputs, ctx, upstream, self.commit)
        self.running[ref] = (s, rec, time.monotonic())
        rec.status = "running"
        self.on_event("start", rec)
        return False

    def _collect(self, ref) -> None:
        import ray

        s, rec, t0 = self.running.pop(ref)
        rec.duration_s = round(time.monotonic() - t0, 2)
        try:
            outcome = ray.get(ref)
        except Exception as e:  # a failed step keeps the rest of the workflow's results
            rec.status, rec.error = "failed", describe_failure(e)
            rec.attempts = attempts(self.root, s.name, rec.cache_key, self.workflow_id)
            self.tracking.end_step(rec.mlflow_run_id, None, failed=True, error=rec.error)
            self.blocked |= self.workflow.downstream_of(s.name)
            self.on_event("failed", rec)
            return
        self.manifests[s.name] = outcome.manifest
        rec.found("ran" if outcome.produced else "cached", outcome.manifest)
        rec.note = outcome.note or rec.note
        rec.attempts = attempts(self.root, s.name, rec.cache_key, self.workflow_id)
        self.tracking.end_step(rec.mlflow_run_id, outcome.manifest)
        self.on_event(rec.status, rec)

    def _finish(self, interrupted: WorkflowInterrupted | None) -> None:
        for rec in self.records.values():
            if rec.status == "running" and interrupted is not None:
                rec.status, rec.error = "killed", f"the driver got {interrupted.signal_name} while it ran"
                self.tracking.end_step(rec.mlflow_run_id, None, error=rec.error, status="KILLED")
            elif rec.status in ("pending", "running"):
                rec.status = "skipped" if rec.name in self.blocked or rec.status == "pending" else "failed"
        self.tracking.end_parent(self.result, status="KILLED" if interrupted is not None else None)


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
