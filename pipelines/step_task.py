"""What runs in a step's Ray task: take the step's lease (one writer per step, see
``components.common.lease``), run the stage, hash its outputs, write the manifest last, release.

A cache check fails closed: a manifest that is not there means "run"; one that cannot be read
(an outage, throttling, denied access) stops the run, naming the object; one that is there but is
not a manifest, or whose files fail verification, is an invalid result: the step runs again, with
a note saying why. The task is retried by Ray only for system failures (its process or node died:
``max_retries`` with ``retry_exceptions=False``); the training inside it has its own retry of
worker deaths (``components.common.trainer``). Every attempt leaves a marker under the step's
``_attempts/<workflow id>/``, so ``summary.json`` can say how many there were.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from components.common.lease import DEFAULT_TTL_S, StepLease
from components.common.redact import redact_config
from components.common.step import (MANIFEST_NAME, FileRecord, Manifest, ManifestInvalid, StepContext, StepOutput,
                                    read_manifest)
from components.common.storage import Storage
from pipelines.models import try_log_step_model

ATTEMPTS_DIR = "_attempts"
POLL_S = 2.0  # how often a run waiting on another's lease looks for the result

log = logging.getLogger("latentflow.workflow")


@dataclass
class StepResult:
    manifest: Manifest
    produced: bool  # False: another run produced it while this one waited for the lease
    note: str | None = None


def step_location(name: str, key: str) -> str:
    return f"steps/{name}/{key}"


def step_dir(root: Storage, name: str, key: str) -> Storage:
    return root.child(step_location(name, key))


def find_cached(root: Storage, name: str, key: str) -> tuple[Manifest | None, str | None]:
    """(verified manifest, None) or (None, why the result cannot be used; None if simply absent).
    A storage error that is not "not found" propagates: it says nothing about the result."""
    try:
        manifest = read_manifest(root, step_location(name, key))
    except ManifestInvalid as e:
        return None, f"{step_dir(root, name, key).uri(MANIFEST_NAME)} is unusable ({e})"
    if manifest is None:
        return None, None
    problems = manifest.verify()
    if problems:
        return None, "manifest present but outputs fail verification: " + "; ".join(problems[:3])
    return manifest, None


def lease_ttl_s() -> float:
    return float(os.environ.get("LATENTFLOW_LEASE_TTL_S", DEFAULT_TTL_S))  # tests shorten it


def execute_step(s, key: str, inputs: dict[str, Manifest], ctx: StepContext, upstream: dict[str, str],
                 commit: str | None) -> StepResult:
    """Body of the Ray task (``s`` is a ``pipelines.workflow.Step``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    record_attempt(ctx)
    lease = StepLease(ctx.output, ctx.workflow_id, lease_ttl_s())
    produced_elsewhere = wait_for_lease(lease, ctx.root, s.name, key)
    if produced_elsewhere is not None:
        return produced_elsewhere
    try:
        cached, _ = find_cached(ctx.root, s.name, key)  # another run may have finished just before us
        if cached is not None:
            return StepResult(cached, produced=False, note="produced by another run")
        lease.start_renewing()
        manifest = run_stage(s, key, inputs, ctx, upstream, commit)
        try_log_step_model(ctx.tracker.tracking_uri, manifest, inputs)  # its model id goes into the manifest
        lease.check()  # a run whose lease was taken over writes no manifest
        ctx.output.write_text(MANIFEST_NAME, manifest.to_json())
        return StepResult(manifest, produced=True)
    finally:
        lease.release()


def wait_for_lease(lease: StepLease, root: Storage, name: str, key: str) -> StepResult | None:
    """None once this run holds the lease; the other run's result if it finishes first."""
    announced = False
    while True:
        holder = lease.try_acquire()
        if holder is None:
            return None
        manifest, _ = find_cached(root, name, key)
        if manifest is not None:
            return StepResult(manifest, produced=False, note=f"produced by workflow {holder.workflow_id!r}")
        if not announced:
            log.warning("step %s: %s is running it; waiting for its result", name, holder.describe())
            announced = True
        time.sleep(POLL_S)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_stage(s, key: str, inputs: dict[str, Manifest], ctx: StepContext, upstream: dict[str, str],
              commit: str | None) -> Manifest:
    """Run the stage and describe what it wrote; the manifest is written by the caller, last."""
    started = now_iso()
    try:
        result = s.entry(s.config, inputs, ctx)
    finally:
        ctx.remove_scratch()
    if not isinstance(result, StepOutput):
        raise TypeError(f"step {s.name!r} returned {type(result).__name__}, expected StepOutput")
    files = [FileRecord(path, ctx.output.sha256(path), ctx.output.size(path)) for path in sorted(result.files)]
    return Manifest(
        step=s.name, cache_key=key, code_version=s.code_version, location=step_location(s.name, key),
        config=redact_config(s.config.model_dump(mode="json")), upstream=upstream, files=files,
        metrics={k: float(v) for k, v in result.metrics.items()}, info=result.info,
        mlflow_run_id=ctx.tracker.run_id, workflow_id=ctx.workflow_id,
        started_at=started, ended_at=now_iso(), git_commit=commit, root=ctx.root.uri(),
    )


def record_attempt(ctx: StepContext) -> None:
    marker = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
    ctx.output.write_text(f"{ATTEMPTS_DIR}/{ctx.workflow_id}/{uuid.uuid4().hex[:12]}.json", json.dumps(marker))


def attempts(root: Storage, name: str, key: str, workflow_id: str) -> int | None:
    """How many times a workflow's step task started (1: no retry); None when storage cannot say
    (the step's own error, not this count, is what a failed run must report)."""
    from components.common.storage import StorageError

    try:
        return len(step_dir(root, name, key).list(f"{ATTEMPTS_DIR}/{workflow_id}"))
    except StorageError:
        return None


def remote_for(s):
    """The step's Ray task, with the resources its config declares. Retried for system failures only
    (its worker process or node died): an exception from the stage is deterministic, and fails it."""
    import ray

    res = s.config.resources
    options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_retries": res.max_retries,
               "retry_exceptions": False, "name": f"step:{s.name}"}
    if res.memory_gb:
        options["memory"] = int(res.memory_gb * 2**30)
    return ray.remote(execute_step).options(**options)
