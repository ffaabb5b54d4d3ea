"""The workflow's MLflow runs: one parent run per ``latentflow run``, one nested run per step.

A cached step still gets its nested run, tagged ``cache_hit=true`` with the id of the run that
produced its outputs, so every workflow reads complete in the MLflow UI.

Nothing reaches MLflow unredacted (``components.common.redact``): the config is redacted once here,
and ``StepTracker`` redacts every param, tag, dict and text it sends, stages' own calls included.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from components.common.redact import redact_config, redact_text
from components.common.step import Manifest
from components.common.tracking import StepTracker, check_reachable, client_for, ensure_experiment, redact_tags
from pipelines.workflow import Step, WorkflowResult

TAG_PREFIX = "latentflow."

log = logging.getLogger("latentflow")


class RunTracker:
    def __init__(self, uri: str, experiment: str, artifact_location: str | None,
                 pipeline: str, resolved_config: dict[str, Any], git_commit: str | None = None):
        self.uri = uri
        check_reachable(uri)  # a named error before any work, not a traceback after minutes of retries
        self.experiment_id = ensure_experiment(uri, experiment, artifact_location)
        self.pipeline = pipeline
        # tracking.uri is in here: its userinfo (https://user:pass@host) is masked with the rest
        self.config = redact_config(resolved_config)
        self.git_commit = git_commit
        self.client = client_for(uri)
        self.parent_run_id: str | None = None
        self.workflow_id = ""

    def _tags(self, **extra) -> dict[str, str]:
        tags = {f"{TAG_PREFIX}workflow_id": self.workflow_id, f"{TAG_PREFIX}pipeline": self.pipeline}
        if self.git_commit:
            tags["mlflow.source.git.commit"] = self.git_commit
        tags.update({k if k.startswith("mlflow.") else TAG_PREFIX + k: str(v) for k, v in extra.items()})
        return redact_tags(tags)  # create_run sends these itself, not through StepTracker

    def start_parent(self, workflow_id: str) -> str:
        self.workflow_id = workflow_id
        run = self.client.create_run(self.experiment_id, run_name=redact_text(f"{self.pipeline}-{workflow_id}"),
                                     tags=self._tags())
        self.parent_run_id = run.info.run_id
        tracker = StepTracker(self.uri, self.parent_run_id)
        tracker.log_params({k: v for k, v in self.config.items() if k in ("storage", "tracking", "ray", "name")})
        tracker.log_dict(self.config, "resolved_config.json")
        return self.parent_run_id

    def _child(self, s: Step, key: str, upstream_runs: dict[str, str | None], **tags) -> str | None:
        """The step's nested run; None (the step goes on untracked) when the server is away."""
        try:
            run = self.client.create_run(
                self.experiment_id, run_name=s.name,
                tags=self._tags(**{"mlflow.parentRunId": self.parent_run_id, "step": s.name,
                                   "cache_key": key, "code_version": s.code_version,
                                   "upstream_run_ids": json.dumps(upstream_runs)}, **tags))
        except Exception as e:  # noqa: BLE001 - tracking never stops a running workflow
            log.warning("MLflow: no run for step %s (%s: %s); it runs untracked", s.name, type(e).__name__,
                        redact_text(str(e))[:300])
            return None
        tracker = StepTracker(self.uri, run.info.run_id)
        config = redact_config(s.config.model_dump(mode="json"))
        tracker.log_params(config)
        tracker.log_dict(config, "config.json")
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
                 error: str | None = None, status: str | None = None) -> None:
        if run_id is None:
            return
        tracker = StepTracker(self.uri, run_id)
        if manifest is not None:
            tracker.log_metrics(manifest.metrics)
            # by structure, not as text: the key rule needs the manifest's config keys
            manifest_data = redact_config(json.loads(manifest.to_json()))
            tracker.log_text(json.dumps(manifest_data, indent=2, sort_keys=True), "manifest.json")
            tracker.set_tags({f"{TAG_PREFIX}manifest_uri": manifest.uri("manifest.json")})
        if error:
            tracker.set_tags({f"{TAG_PREFIX}error": error[:5000]})
        tracker.end(status=status or ("FAILED" if failed else "FINISHED"))

    def end_parent(self, result: WorkflowResult, status: str | None = None) -> None:
        if self.parent_run_id is None:
            return
        tracker = StepTracker(self.uri, self.parent_run_id)
        counts = {status: sum(r.status == status for r in result.steps) for status in ("ran", "cached", "failed")}
        tracker.log_metrics({f"steps_{k}": v for k, v in counts.items()})
        tracker.log_dict({"steps": [r.__dict__ for r in result.steps]}, "summary.json")
        tracker.end(status=status or ("FINISHED" if result.ok else "FAILED"))

