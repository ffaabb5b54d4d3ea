"""MLflow tracking through ``MlflowClient`` with explicit run ids.

The driver creates one parent run per ``latentflow run`` and one nested run per step; steps (in
Ray tasks and Ray Train workers, in other processes) log to their run by id. Nothing here uses the
fluent ``mlflow.start_run`` state, which is per-process and would not follow a step to its workers.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

# MLflow's SQLite store is the embedded default; keep its logs quiet and its telemetry off.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


class TrackingConfigError(ValueError):
    pass


def resolve_tracking(uri: str | None, root_uri: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None to let the server decide).

    Order: the config's ``tracking.uri``, then ``MLFLOW_TRACKING_URI``, then an SQLite database
    under a local storage root with artifacts beside it."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    root_is_s3 = root_uri.startswith("s3://")
    if uri is None:
        if root_is_s3:
            raise TrackingConfigError(
                "tracking.uri (or MLFLOW_TRACKING_URI) is required when storage.root is on S3: "
                "point it at an MLflow server"
            )
        root = os.path.abspath(root_uri)
        os.makedirs(root, exist_ok=True)
        return f"sqlite:///{root}/mlflow.db", f"file://{root}/mlartifacts"
    if uri.startswith(("http://", "https://", "databricks")):
        return uri, None  # the server owns artifact storage (--artifacts-destination)
    artifacts = f"{root_uri.rstrip('/')}/mlartifacts"
    return uri, artifacts if root_is_s3 else f"file://{os.path.abspath(artifacts)}"


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"dit.optimizer.lr": "0.0001"} for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(value) if isinstance(value, (list, tuple)) else str(value)}


class StepTracker:
    """Logs to one MLflow run by id; picklable, so it travels to Ray tasks and Train workers."""

    def __init__(self, tracking_uri: str, run_id: str | None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, value: dict, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, value, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        """``image``: a PIL image or an HxW / HxWxC uint8 array."""
        if self.enabled:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def child(self, run_name: str, tags: dict[str, Any] | None = None) -> "StepTracker":
        """A run nested under this one (e.g. one round of a step), in the same experiment; finish
        it with ``end``. Disabled when this tracker is."""
        if not self.enabled:
            return StepTracker(self.tracking_uri, None)
        parent = self.client.get_run(self.run_id)
        inherited = {k: v for k, v in parent.data.tags.items() if k.startswith("latentflow.")}
        run = self.client.create_run(parent.info.experiment_id, run_name=run_name,
                                     tags={**inherited, **{k: str(v) for k, v in (tags or {}).items()},
                                           "mlflow.parentRunId": self.run_id})
        return StepTracker(self.tracking_uri, run.info.run_id)

    def end(self, failed: bool = False) -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, local_path, artifact_path)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
