"""Running a workflow for real: Ray start-up, MLflow runs, the workflow summary."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Callable

from components.common.config import RayConfig, TrackingConfig
from components.common.storage import Storage
from components.common.tracking import resolve_tracking
from pipelines.config import PipelineConfig
from pipelines.tracking import RunTracker
from pipelines.workflow import StepRecord, Workflow, WorkflowResult, WorkflowRunner, git_commit

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


def write_summary(root: Storage, result: WorkflowResult, pipeline: str, started_at: str) -> str:
    summary = {
        "workflow_id": result.workflow_id,
        "pipeline": pipeline,
        "status": "succeeded" if result.ok else "failed",
        "started_at": started_at,
        "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mlflow_parent_run_id": result.parent_run_id,
        "steps": [asdict(r) for r in result.steps],
    }
    rel = summary_path(result.workflow_id)
    root.write_text(rel, json.dumps(summary, indent=2))
    return root.uri(rel)


def run_workflow(workflow: Workflow, root: Storage, tracking: TrackingConfig, experiment: str,
                 resolved_config: dict[str, Any], ray_cfg: RayConfig, workflow_id: str | None = None,
                 on_event: Callable[[str, StepRecord], None] | None = None) -> tuple[WorkflowResult, str]:
    """Run (or resume) a workflow; returns the result and the URI of its summary.json."""
    workflow_id = workflow_id or new_workflow_id()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    uri, artifact_location = resolve_tracking(tracking.uri, root.uri())
    tracker = RunTracker(uri, experiment, artifact_location, workflow.name, resolved_config, git_commit())
    runner = WorkflowRunner(workflow, root, workflow_id, tracker, on_event, lambda: ensure_ray(ray_cfg))
    result = runner.run()
    return result, write_summary(root, result, workflow.name, started)


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
