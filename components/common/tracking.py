"""MLflow tracking through ``MlflowClient`` with explicit run ids: the connection, and ``StepTracker``,
through which a step logs to its run (the workflow's own runs: ``pipelines.workflow_tracking``).

The driver creates one parent run per ``latentflow run`` and one nested run per step; steps (in
Ray tasks and Ray Train workers, in other processes) log to their run by id. Nothing here uses the
fluent ``mlflow.start_run`` state, which is per-process and would not follow a step to its workers.

Tracking is the record people read, not the record of truth (manifests and summary.json are): an
unreachable server is refused before any work (``check_reachable``), but once a run has started
a logging call that fails never fails the step. ``StepTracker`` keeps the metrics it could not
send and sends them with the next call that gets through; other calls are logged and dropped.
"""

from __future__ import annotations

import io
import json
import logging
import os
from contextlib import contextmanager
from typing import Any

from components.common.redact import redact, redact_text

log = logging.getLogger(__name__)
MAX_UNSENT = 100_000  # metric points kept while the server is away (~10 MB)
QUIET_AFTER_FAILURE_S = 60.0



def telemetry_off_unless_asked() -> None:
    """The ``latentflow`` command's choice for its own process and the Ray workers it starts: MLflow's
    usage telemetry off unless the user set ``MLFLOW_DISABLE_TELEMETRY`` / ``DO_NOT_TRACK``. Not done
    at import: a library that imports this module keeps its own environment."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


class TrackingConfigError(ValueError):
    pass


def health_request(uri: str):
    """A GET of the server's /health; userinfo in the URI (``https://user:pass@host``, which MLflow
    accepts) becomes a basic-auth header, as MLflow's own client sends it."""
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri.rstrip("/"))
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=parts.path + "/health")))
    if parts.username is not None:
        token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
                                 .encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


class TrackingUnreachable(TrackingConfigError):
    """The MLflow tracking server does not answer; the message names it (credentials masked)."""


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Before any work: an http(s) tracking server must answer its /health endpoint."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    request = health_request(uri)
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy's 401, say): reachable
    except (OSError, ValueError) as e:
        raise TrackingUnreachable(f"the MLflow tracking server {redact_text(uri)} does not answer ({e}); start it, "
                                  "or point tracking.uri / MLFLOW_TRACKING_URI at one that runs") from None


def resolve_tracking(uri: str | None, root_uri: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None to let the server decide).

    Order: the config's ``tracking.uri`` (where ``load_config`` already put ``MLFLOW_TRACKING_URI``
    over the file's value), then ``MLFLOW_TRACKING_URI`` (a config built in code), then an SQLite
    database under a local storage root with artifacts beside it."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    root_is_s3 = root_uri.startswith("s3://")
    if uri is None:
        if root_is_s3:
            raise TrackingConfigError(
                "tracking.uri (or MLFLOW_TRACKING_URI) is required when storage.root is on S3: "
                "point it at an MLflow server"
            )
        from pathlib import Path

        from components.common.embedded_store import relocate

        root = os.path.abspath(root_uri)
        relocate(Path(root))  # a copied or moved root: its store's artifact paths follow it
        return f"sqlite:///{root}/mlflow.db", f"file://{root}/mlartifacts"
    if uri.startswith(("http://", "https://", "databricks")):
        return uri, None  # the server owns artifact storage (--artifacts-destination)
    artifacts = f"{root_uri.rstrip('/')}/mlartifacts"
    return uri, artifacts if root_is_s3 else f"file://{os.path.abspath(artifacts)}"


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# The MLflow UI opens an experiment on what its kind says: runs for model training, traces for GenAI.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(uri: str, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created if absent, marked as model training (unless someone marked it)."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:  # created concurrently by another process
            found = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return found.experiment_id


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"dit.optimizer.lr": "0.0001"} for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(value) if isinstance(value, (list, tuple)) else str(value)}


class StepTracker:
    """Logs to one MLflow run by id; picklable, so it travels to Ray tasks and Train workers.
    ``progress``: the step's line to the driver's live view (``components.common.progress``)."""

    def __init__(self, tracking_uri: str, run_id: str | None, progress=None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.progress = progress
        self._client = None
        self._unsent: list = []  # metrics that failed to send, sent with the next call that works
        self.failures = 0
        self._quiet_until = 0.0

    def __getstate__(self):
        return {**self.__dict__, "_client": None, "_unsent": [], "_quiet_until": 0.0}

    def _safely(self, what: str, call) -> bool:
        """Whether ``call()`` worked; a failure is counted and logged (the first few, then every
        100th), never raised. After a failure the server is left alone for ``QUIET_AFTER_FAILURE_S``
        (calls fail at once; metrics wait in the buffer), so a server that is down costs a training
        loop one failed call a minute, not MLflow's retries at every log step."""
        import time

        if time.monotonic() < self._quiet_until:
            return False
        try:
            call()
            return True
        except Exception as e:  # noqa: BLE001 - tracking is best-effort once a step runs
            self.failures += 1
            self._quiet_until = time.monotonic() + QUIET_AFTER_FAILURE_S
            if self.failures <= 3 or self.failures % 100 == 0:
                log.warning("MLflow %s for run %s failed (%d so far; the step goes on): %s: %s", what, self.run_id,
                            self.failures, type(e).__name__, redact_text(str(e))[:300])
            return False

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or not (metrics or self._unsent):
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = self._unsent + [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._unsent = []
        for i in range(0, len(batch), 500):
            part = batch[i: i + 500]
            if not self._safely("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=part)):
                self._unsent = (self._unsent + part)[-MAX_UNSENT:]  # kept for the next call

    # Everything below leaves the process for the tracking server: each call redacts what it sends.
    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        # redact before flattening: the key rule needs the nested keys, and lists become JSON text
        items = [Param(k, v[:6000]) for k, v in flatten(redact(params)).items()]
        for i in range(0, len(items), 100):
            self._safely("log_params", lambda: self.client.log_batch(self.run_id, params=items[i : i + 100]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)) for k, v in redact_tags(tags).items()]
        self._safely("set_tags", lambda: self.client.log_batch(self.run_id, tags=tags))

    def log_dict(self, value: dict, artifact_file: str) -> None:
        if self.enabled:
            self._safely(f"log_dict {artifact_file}", lambda: self.client.log_dict(self.run_id, redact(value),
                                                                                 artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._safely(f"log_text {artifact_file}", lambda: self.client.log_text(self.run_id, redact_text(text),
                                                                                 artifact_file))

    def log_image(self, image, artifact_file: str | None = None, key: str | None = None,
                  step: int | None = None) -> None:
        """``image``: a PIL image or an HxW / HxWxC uint8 array. Either an ``artifact_file``, or a
        ``key`` and ``step``: one image of a series, which the run page's Images view shows by step."""
        if self.enabled:
            self._safely(f"log_image {artifact_file or key}",
                         lambda: self.client.log_image(self.run_id, image, artifact_file=artifact_file, key=key,
                                                       step=step))

    def child(self, run_name: str, tags: dict[str, Any] | None = None) -> "StepTracker":
        """A run nested under this one (e.g. one round of a step), in the same experiment; finish
        it with ``end``. Disabled when this tracker is."""
        if not self.enabled:
            return StepTracker(self.tracking_uri, None, self.progress)
        created = []

        def create():
            parent = self.client.get_run(self.run_id)
            inherited = {k: v for k, v in parent.data.tags.items() if k.startswith("latentflow.")}
            created.append(self.client.create_run(parent.info.experiment_id, run_name=run_name, tags={
                **inherited, **redact_tags(tags or {}), "mlflow.parentRunId": self.run_id}))

        self._safely(f"create child run {run_name!r}", create)  # without a server: a disabled child
        return StepTracker(self.tracking_uri, created[0].info.run_id if created else None, self.progress)

    def end(self, failed: bool = False, status: str | None = None) -> None:
        if self.enabled:
            self._quiet_until = 0.0  # the last chance: try once more
            self.log_metrics({})  # nothing new, but what is still unsent gets another try
            status = status or ("FAILED" if failed else "FINISHED")
            self._safely("set_terminated", lambda: self.client.set_terminated(self.run_id, status=status))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._safely(f"log_artifact {local_path}",
                         lambda: self.client.log_artifact(self.run_id, local_path, artifact_path))


@contextmanager
def system_metrics(tracker: "StepTracker | None", node_rank: int = 0):
    """MLflow's system metrics (CPU, memory, disk, network; GPU where ``pynvml`` is installed) of
    this machine, sampled every 10 s into the tracker's run as ``system/...`` (``system/node<k>/...``
    for nodes after the first) while the block runs. Never fails the block."""
    monitor = None
    if tracker is not None and tracker.enabled:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(tracker.run_id, tracking_uri=tracker.tracking_uri,
                                           node_id=f"node{node_rank}" if node_rank else None)
            monitor.start()
        except Exception as e:  # noqa: BLE001 - monitoring is best-effort
            log.warning("MLflow system metrics are off for run %s (%s: %s)", tracker.run_id, type(e).__name__,
                        redact_text(str(e))[:200])
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            try:
                monitor.finish()
            except Exception:  # noqa: BLE001
                pass


def redact_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as strings, redacted: a value becomes text first so the value rules see it whole."""
    return redact({k: str(v) for k, v in tags.items()})


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
