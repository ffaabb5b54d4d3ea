"""Faults injected into real runs, each test asserting what was kept (README, "What survives what"):

- a training worker killed with SIGKILL mid-DiT: the step restarts from its checkpoint, ends at max_steps;
- the driver killed with SIGKILL mid-DiT, then the same workflow id run again: no finished step
  runs again, the DiT resumes from its last checkpoint and ends at max_steps;
- the driver stopped with SIGTERM: summary.json says killed, its MLflow runs end KILLED;
- the S3 server stopped mid-step: a named error, no manifest; a re-run succeeds once it is back;
- the MLflow server stopped mid-run: the training step still finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.common.step import Manifest, read_manifest_at
from components.common.storage import Storage
from conftest import REPO, free_port, s3_environment

pytestmark = pytest.mark.integration
SMOKE = str(REPO / "configs" / "pipeline" / "smoke.yaml")


def start_cli(*args: str, env: dict, log: Path) -> subprocess.Popen:
    """``latentflow`` in its own process group (its local Ray with it), output to ``log``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env={**base, **env},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{log.read_text()[-4000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.3)


def new_checkpoints(root: Storage, step: str, before: set[str]) -> set[str]:
    return {r for r in root.list(f"steps/{step}") if r.endswith("train_state.json")} - before


def summary(root: Storage, workflow_id: str) -> dict:
    return json.loads(root.read_text(f"workflows/{workflow_id}/summary.json"))


def step_manifest(root: Storage, record: dict) -> Manifest:
    return read_manifest_at(root.uri(record["manifest_path"]))


def test_a_killed_training_worker_restarts_the_step_from_its_checkpoint(ray_cluster, tmp_path):
    """SIGKILL to one of the DiT's Ray Train workers: the trainer's own retry (for lost workers
    only) starts a new worker group from the last checkpoint; the step ends at max_steps."""
    from test_dit import dit_cfg, mlflow_tracker, step_ctx, tiny_latent_inputs

    from components.dit.train import run as train_dit

    inputs = tiny_latent_inputs(tmp_path)
    cfg = dit_cfg(train={"max_steps": 150, "batch_size": 16, "checkpoint_every": 10, "log_every": 10})
    ctx = step_ctx(tmp_path, "dit", mlflow_tracker(tmp_path))
    ctx.resources.max_retries = 1
    checkpoints = Path(ctx.checkpoint_uri)
    killed = []

    def kill_a_worker_after_the_first_checkpoint():
        wait_for(lambda: list(checkpoints.rglob("train_state.json")), 300, "a checkpoint")
        time.sleep(3)  # Ray Train registers a reported checkpoint at its next poll (trainer.HEALTH_CHECK_INTERVAL)
        workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        killed.append(int(workers[-1]))
        os.kill(killed[-1], signal.SIGKILL)

    import threading

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint)
    killer.start()
    out = train_dit(cfg, inputs, ctx)
    killer.join()
    assert killed, "no worker was killed"
    assert out.metrics["steps"] == 150 and out.metrics["train_attempts"] == 2
    assert out.metrics["resumed_from_step"] >= 10 and out.metrics["resumed_from_step"] % 10 == 0


def test_a_killed_driver_resumes_where_it_stopped_with_the_same_workflow_id(smoke_on_s3, mlflow_server, tmp_path):
    """SIGKILL to the CLI's process group (the driver and its local Ray) mid-DiT. The summary
    written as steps ran shows what finished; the same workflow id again runs none of it again,
    and the DiT resumes from its last checkpoint (its lease, the dead run's, is the workflow's own)."""
    root_uri, s3_env, first = smoke_on_s3
    assert first.returncode == 0, first.stderr[-2000:]
    root = Storage.from_uri(root_uri)
    args = ("run", SMOKE, "--only", "dit", "--workflow-id", "wf-killed", "--set", f"storage.root={root_uri}",
            "--set", f"tracking.uri={mlflow_server}", "--set", "latents.batch_size=128",  # a latents step to finish
            "--set", "dit.train.seed=7", "--set", "dit.train.max_steps=200", "--set", "dit.train.checkpoint_every=20")
    before = new_checkpoints(root, "dit", set())
    log = tmp_path / "first.log"
    driver = start_cli(*args, env=s3_env, log=log)
    wait_for(lambda: new_checkpoints(root, "dit", before), 400, "a DiT checkpoint", driver, log)
    time.sleep(3)  # Ray Train registers a reported checkpoint at its next poll (trainer.HEALTH_CHECK_INTERVAL)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(30)
    left = {s["name"]: s["status"] for s in summary(root, "wf-killed")["steps"]}
    assert left["latents"] == "ran" and left["dit"] == "running", left  # the record survived the driver

    again = start_cli(*args, env=s3_env, log=tmp_path / "again.log")
    assert again.wait(600) == 0, (tmp_path / "again.log").read_text()[-4000:]
    records = {s["name"]: s for s in summary(root, "wf-killed")["steps"]}
    assert {name: r["status"] for name, r in records.items()} == {
        "shard": "cached", "autoencoder": "cached", "latents": "cached", "dit": "ran"}
    dit = step_manifest(root, records["dit"])
    assert dit.metrics["steps"] == 200 and dit.metrics["resumed_from_step"] >= 20
    assert records["dit"]["attempts"] == 2 and records["latents"]["attempts"] == 0  # counted in summary.json


def test_sigterm_ends_the_summary_and_the_mlflow_runs_as_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "out"
    log = tmp_path / "run.log"
    driver = start_cli("run", SMOKE, "--only", "shard", "--workflow-id", "wf-term", "--set", f"storage.root={root}",
                       "--set", "shard.max_samples=5000", "--set", "shard.samples_per_shard=50",
                       "--set", "shard.resources.num_workers=1", env={}, log=log)  # one worker: ~8 s of work
    wait_for(lambda: "start shard" in " ".join(log.read_text().split()), 120, "the shard step", driver, log)
    os.kill(driver.pid, signal.SIGTERM)  # the driver only, as a job stop or a pod eviction does
    assert driver.wait(60) == 143, log.read_text()[-3000:]
    assert "stopped by SIGTERM" in log.read_text() and "--workflow-id wf-term" in log.read_text()
    recorded = json.loads((root / "workflows" / "wf-term" / "summary.json").read_text())
    assert recorded["status"] == "killed" and recorded["steps"][0]["status"] == "killed"
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.get_run(recorded["mlflow_parent_run_id"]).info.status == "KILLED"
    assert client.get_run(recorded["steps"][0]["mlflow_run_id"]).info.status == "KILLED"


def test_an_s3_outage_mid_step_is_a_named_error_and_the_rerun_succeeds(s3_server, tmp_path):
    """A second moto server (the same buckets) stopped while the shard step uploads."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lf-outage")
    env = {**s3_environment(), "AWS_ENDPOINT_URL": endpoint, "LATENTFLOW_S3_MAX_ATTEMPTS": "2"}
    root_uri = "s3://lf-outage/smoke"
    args = ("run", SMOKE, "--only", "shard", "--workflow-id", "wf-outage", "--set", f"storage.root={root_uri}",
            "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--set", "shard.max_samples=5000",
            "--set", "shard.samples_per_shard=50")
    client = boto3.client("s3", endpoint_url=endpoint)
    log = tmp_path / "outage.log"
    driver = start_cli(*args, env=env, log=log)
    wait_for(lambda: client.list_objects_v2(Bucket="lf-outage", Prefix="smoke/steps/shard/").get("KeyCount", 0) > 0,
             120, "the first shard", driver, log)
    server.stop()
    assert driver.wait(300) == 1, log.read_text()[-3000:]
    output = " ".join(log.read_text().split())  # rich wraps long lines
    assert "failed shard" in output and "s3://lf-outage/smoke/" in output and "unreachable" in output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        assert not [o for o in client.list_objects_v2(Bucket="lf-outage", Prefix="smoke/steps/shard/")["Contents"]
                    if o["Key"].endswith("manifest.json")]  # nothing half-succeeded
        rerun = start_cli(*args, env=env, log=tmp_path / "rerun.log")
        assert rerun.wait(300) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
        recorded = json.loads(client.get_object(Bucket="lf-outage", Key="smoke/workflows/wf-outage/summary.json")
                              ["Body"].read())
        assert recorded["status"] == "succeeded" and recorded["steps"][0]["status"] == "ran"
    finally:
        server.stop()


def test_an_mlflow_outage_mid_run_lets_the_training_step_finish(tmp_path):
    port = free_port()
    workdir = tmp_path / "mlflow"
    workdir.mkdir()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db", "--artifacts-destination",
                               str(workdir / "artifacts"), "--workers", "1"],
                              stdout=open(workdir / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return True
        except OSError:
            return False

    root = tmp_path / "out"
    log = tmp_path / "run.log"
    try:
        wait_for(answers, 90, "the mlflow server")
        env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        driver = start_cli("run", SMOKE, "--only", "autoencoder", "--workflow-id", "wf-mlflow", "--set",
                           f"storage.root={root}", "--set", f"tracking.uri=http://127.0.0.1:{port}",
                           "--set", "autoencoder.train.max_steps=150", "--set", "autoencoder.train.checkpoint_every=15",
                           env=env, log=log)
        wait_for(lambda: list((root / "steps" / "autoencoder").rglob("train_state.json")), 400,
                 "an autoencoder checkpoint", driver, log)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    driver.wait(600)
    recorded = json.loads((root / "workflows" / "wf-mlflow" / "summary.json").read_text())
    steps = {s["name"]: s for s in recorded["steps"]}
    assert steps["autoencoder"]["status"] == "ran", log.read_text()[-4000:]
    manifest = read_manifest_at(str(root / steps["autoencoder"]["manifest_path"]))
    assert manifest.metrics["steps"] == 150 and not manifest.verify()
    assert "MLflow" in log.read_text()  # the failed logging was said, not hidden
