"""Running a workflow for real: Ray start-up, MLflow runs, the workflow summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Callable

from components.common.config import RayConfig, TrackingConfig
from components.common.progress import start_board
from components.common.storage import Storage, StorageError
from components.common.tracking import resolve_tracking
from pipelines.config import PipelineConfig
from pipelines.workflow_tracking import RunTracker
from pipelines.runner import WorkflowInterrupted, WorkflowRunner
from pipelines.workflow import StepRecord, Workflow, WorkflowResult, git_commit

log = logging.getLogger("latentflow")


def new_workflow_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def ensure_ray(cfg: RayConfig) -> None:
    """Start or join Ray once, only when a step actually has to run (a fully cached run never waits
    for Ray). Inside a Ray job ``address=None`` joins the job's cluster (RAY_ADDRESS is set)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"address": cfg.address, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if cfg.runtime_env:
        kwargs["runtime_env"] = cfg.runtime_env
    if cfg.address is None and "RAY_ADDRESS" not in os.environ:
        # A fresh Ray for this run; joining a running cluster is explicit (`ray.address: auto`).
        kwargs.update(address="local", num_cpus=cfg.num_cpus, include_dashboard=False)
    ray.init(**kwargs)


def summary_path(workflow_id: str) -> str:
    return f"workflows/{workflow_id}/summary.json"


def write_summary(root: Storage, result: WorkflowResult, pipeline: str, started_at: str,
                  status: str | None = None) -> str:
    """``status``: "running" while the workflow runs, "killed" when its driver was stopped;
    otherwise "succeeded" or "failed" from the steps."""
    from components.common.redact import redact

    summary = {
        "workflow_id": result.workflow_id,
        "pipeline": pipeline,
        "status": status or ("succeeded" if result.ok else "failed"),
        "started_at": started_at,
        "ended_at": None if status == "running" else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mlflow_parent_run_id": result.parent_run_id,
        "steps": [asdict(r) for r in result.steps],
    }
    rel = summary_path(result.workflow_id)
    # step errors quote what failed (URLs with credentials, config values): redact before writing
    root.write_text(rel, json.dumps(redact(summary), indent=2))
    return root.uri(rel)


def run_workflow(workflow: Workflow, root: Storage, tracking: TrackingConfig, experiment: str,
                 resolved_config: dict[str, Any], ray_cfg: RayConfig, workflow_id: str | None = None,
                 on_event: Callable[[str, StepRecord], None] | None = None) -> tuple[WorkflowResult, str]:
    """Run (or resume) a workflow; returns the result and the URI of its summary.json."""
    workflow_id = workflow_id or new_workflow_id()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    root.exists(summary_path(workflow_id))  # storage unreadable: a StorageError naming it, before any work
    uri, artifact_location = resolve_tracking(tracking.uri, root.uri())
    tracker = RunTracker(uri, experiment, artifact_location, workflow.name, resolved_config, git_commit())

    def progress(event: str, record: StepRecord) -> None:  # the record survives a killed driver
        if on_event is not None:
            on_event(event, record)
        try:
            write_summary(root, runner.result, workflow.name, started, status="running")
        except StorageError as e:  # the final write, at the end, is the one that must not fail
            log.warning("could not update %s (%s)", root.uri(summary_path(workflow_id)), e)

    board = []  # the steps' progress board (components/common/progress.py), held while the workflow runs

    def start_ray() -> None:
        ensure_ray(ray_cfg)
        stop.arm()  # ray.init installs its own SIGTERM handler (it aborts the driver): ours goes back on
        board[:] = board or [start_board(workflow_id)]

    with stop_on_signals() as stop:
        runner = WorkflowRunner(workflow, root, workflow_id, tracker, progress, start_ray, lambda: stop.requested)
        try:
            result = runner.run()
        except WorkflowInterrupted:
            write_summary(root, runner.result, workflow.name, started, status="killed")
            raise
    return result, write_summary(root, result, workflow.name, started)


class StopRequest:
    """Set by SIGTERM (a stopped job, an evicted pod) or SIGINT (Ctrl-C) in the driver: the runner
    looks at ``requested`` every second and stops cleanly. A handler that raised instead would
    raise inside Ray's blocking calls, which do not expect it."""

    def __init__(self):
        self.requested: str | None = None

    def _note(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def arm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._note)


@contextmanager
def stop_on_signals():
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop.arm()
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_pipeline(cfg: PipelineConfig, workflow_id: str | None = None,
                 on_event: Callable[[str, StepRecord], None] | None = None,
                 only: list[str] | None = None) -> tuple[WorkflowResult, str]:
    """``only``: run just these steps and the steps they need."""
    from pipelines.latent_diffusion import build_workflow

    workflow = build_workflow(cfg)
    if only:
        workflow = workflow.restricted_to(only)
    return run_workflow(workflow, Storage.from_uri(cfg.storage.root), cfg.tracking,
                        cfg.experiment_name, cfg.resolved(), cfg.ray, workflow_id, on_event)
