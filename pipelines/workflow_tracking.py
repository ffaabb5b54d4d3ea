"""The workflow-level MLflow runs: one parent run per ``latentflow run``, one nested run per step
(the steps log to theirs through ``components.common.tracking.StepTracker``).

A cached step still gets its nested run, tagged ``cache_hit=true`` with the id of the run that
produced its outputs, so every workflow reads complete in the MLflow UI.

Nothing reaches MLflow unredacted (``components.common.redact``): the config is redacted once here,
and ``StepTracker`` redacts every param, tag, dict and text it sends, stages' own calls included.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from components.common.redact import redact_command, redact_config, redact_text
from components.common.step import Manifest
from components.common.tracking import StepTracker, check_reachable, client_for, ensure_experiment, redact_tags
from pipelines.dag import DATA, EVALUATION, steps_of_role
from pipelines.workflow import Step, WorkflowResult

TAG_PREFIX = "latentflow."
DATASET_STEPS = steps_of_role(DATA)  # steps whose output is a data set (images; their latents)
EVALUATION_STEPS = steps_of_role(EVALUATION)  # read data sets to score, not to train

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
        tags = {f"{TAG_PREFIX}workflow_id": self.workflow_id, f"{TAG_PREFIX}pipeline": self.pipeline,
                **source_tags()}
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

    def start_step(self, s: Step, key: str, upstream_runs: dict[str, str | None],
                   manifests: dict[str, Manifest] | None = None) -> str:
        run_id = self._child(s, key, upstream_runs, cache_hit="false")
        self.log_datasets(run_id, s, manifests or {})
        return run_id

    def cached_step(self, s: Step, manifest: Manifest, manifests: dict[str, Manifest]) -> str:
        upstream_runs = {i: manifests[i].mlflow_run_id for i in s.inputs}
        run_id = self._child(s, manifest.cache_key, upstream_runs, cache_hit="true",
                             source_run_id=manifest.mlflow_run_id or "")
        self.log_datasets(run_id, s, manifests)
        self.end_step(run_id, manifest)
        return run_id

    def log_datasets(self, run_id: str | None, s: Step, manifests: dict[str, Manifest]) -> None:
        """The data sets the step reads (the shard step's images, the latents), as run inputs."""
        context = "eval" if s.name in EVALUATION_STEPS else "train"
        names = [name for name in s.inputs if name in DATASET_STEPS and name in manifests]
        if run_id is not None and names:
            StepTracker(self.uri, run_id)._safely("log_inputs", lambda: self.client.log_inputs(run_id, [
                dataset_input(self.pipeline, name, manifests[name], context) for name in names]))

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



def source_tags() -> dict[str, str]:
    """Who ran it and from what: MLflow's own user and source tags (a Ray job's driver says JOB)."""
    import getpass
    import os
    import sys

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    command = redact_command(["latentflow", *sys.argv[1:]] if sys.argv and sys.argv[0] else ["latentflow"])
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor for a job's driver
    return {"mlflow.user": user, "mlflow.source.name": command[:500],
            "mlflow.source.type": "JOB" if in_job else "LOCAL"}


def dataset_input(pipeline: str, step: str, manifest: Manifest, context: str):
    """A step's output as an MLflow data set: its location as the source, its manifest digest (which
    names the exact bytes) as the digest, the sample counts of its manifest as the profile."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    uri = manifest.output_uri
    with warnings.catch_warnings():  # MLflow registers its local source twice and warns about it
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri if "://" in uri else f"file://{uri}")
    dataset = MetaDataset(source, name=f"{pipeline}-{step}", digest=manifest.digest[:16])
    entity = dataset._to_mlflow_entity()
    counts = {k: int(v) for k, v in manifest.metrics.items() if k.startswith("num_")}
    entity = Dataset(entity.name, entity.digest, entity.source_type, entity.source, entity.schema,
                     json.dumps(counts) if counts else None)
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
