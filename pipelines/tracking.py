"""The workflow's MLflow runs: one parent run per ``latentflow run``, one nested run per step.

A cached step still gets its nested run, tagged ``cache_hit=true`` with the id of the run that
produced its outputs, so every workflow reads complete in the MLflow UI.
"""

from __future__ import annotations

import json
from typing import Any

from components.common.config import redact
from components.common.step import Manifest
from components.common.tracking import StepTracker, client_for, ensure_experiment
from pipelines.workflow import Step, WorkflowResult

TAG_PREFIX = "latentflow."


class RunTracker:
    def __init__(self, uri: str, experiment: str, artifact_location: str | None,
                 pipeline: str, resolved_config: dict[str, Any], git_commit: str | None = None):
        self.uri = uri
        self.experiment_id = ensure_experiment(uri, experiment, artifact_location)
        self.pipeline = pipeline
        self.config = redact(resolved_config)
        self.git_commit = git_commit
        self.client = client_for(uri)
        self.parent_run_id: str | None = None
        self.workflow_id = ""

    def _tags(self, **extra) -> dict[str, str]:
        tags = {f"{TAG_PREFIX}workflow_id": self.workflow_id, f"{TAG_PREFIX}pipeline": self.pipeline}
        if self.git_commit:
            tags["mlflow.source.git.commit"] = self.git_commit
        tags.update({k if k.startswith("mlflow.") else TAG_PREFIX + k: str(v) for k, v in extra.items()})
        return tags

    def start_parent(self, workflow_id: str) -> str:
        self.workflow_id = workflow_id
        run = self.client.create_run(self.experiment_id, run_name=f"{self.pipeline}-{workflow_id}",
                                     tags=self._tags())
        self.parent_run_id = run.info.run_id
        tracker = StepTracker(self.uri, self.parent_run_id)
        tracker.log_params({k: v for k, v in self.config.items() if k in ("storage", "tracking", "ray", "name")})
        tracker.log_dict(self.config, "resolved_config.json")
        return self.parent_run_id

    def _child(self, s: Step, key: str, upstream_runs: dict[str, str | None], **tags) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=s.name,
            tags=self._tags(**{"mlflow.parentRunId": self.parent_run_id, "step": s.name,
                               "cache_key": key, "code_version": s.code_version,
                               "upstream_run_ids": json.dumps(upstream_runs)}, **tags))
        tracker = StepTracker(self.uri, run.info.run_id)
        tracker.log_params(s.config.model_dump(mode="json"))
        tracker.log_dict(redact(s.config.model_dump(mode="json")), "config.json")
        return run.info.run_id

    def start_step(self, s: Step, key: str, upstream_runs: dict[str, str | None]) -> str:
        return self._child(s, key, upstream_runs, cache_hit="false")

    def cached_step(self, s: Step, manifest: Manifest, manifests: dict[str, Manifest]) -> str:
        upstream_runs = {i: manifests[i].mlflow_run_id for i in s.inputs}
        run_id = self._child(s, manifest.cache_key, upstream_runs, cache_hit="true",
                             source_run_id=manifest.mlflow_run_id or "")
        self.end_step(run_id, manifest)
        return run_id

    def end_step(self, run_id: str | None, manifest: Manifest | None, failed: bool = False,
                 error: str | None = None) -> None:
        if run_id is None:
            return
        tracker = StepTracker(self.uri, run_id)
        if manifest is not None:
            tracker.log_metrics(manifest.metrics)
            tracker.log_text(manifest.to_json(), "manifest.json")
            tracker.set_tags({f"{TAG_PREFIX}manifest_uri": manifest.uri("manifest.json")})
        if error:
            tracker.set_tags({f"{TAG_PREFIX}error": error[:5000]})
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def end_parent(self, result: WorkflowResult) -> None:
        if self.parent_run_id is None:
            return
        tracker = StepTracker(self.uri, self.parent_run_id)
        counts = {status: sum(r.status == status for r in result.steps) for status in ("ran", "cached", "failed")}
        tracker.log_metrics({f"steps_{k}": v for k, v in counts.items()})
        tracker.log_dict({"steps": [r.__dict__ for r in result.steps]}, "summary.json")
        self.client.set_terminated(self.parent_run_id, status="FINISHED" if result.ok else "FAILED")

