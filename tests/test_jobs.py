"""``latentflow submit`` and ``latentflow jobs`` against a real Ray head with its job server: the
smoke pipeline submitted as a Ray job, followed to its end, and visible in MLflow afterwards.

The head runs with token authentication (Ray's default for local clusters since 2.59), every port
chosen free (a second Ray on this machine must not collide with the test session's), and the
project's virtual environment first on its PATH, as a user who activated it would start it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration
VENV_BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """(dashboard address, env with the token) of a fresh Ray head on 127.0.0.1; stopped afterwards."""
    home = tmp_path_factory.mktemp("head")
    token = home / "token"
    token.write_text(secrets.token_hex(32))
    gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics = free_ports(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}")
    temp_dir = Path("/tmp") / f"lf-head-{secrets.token_hex(3)}"  # short: Ray's unix sockets live here
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=open(home / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start: {(home / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head takes its processes down with it
        try:
            head.wait(5)  # a graceful stop took over 15 s here: the group is killed after 5
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def cli(*args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_the_smoke_pipeline_and_follow_it(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    root = tmp_path / "out"
    done = cli("submit", "configs/pipeline/smoke.yaml", "--address", address, "--set", f"storage.root={root}",
               "--set", "superres=null", "--set", "distill=null",
               "--set", "evaluate.inception.enabled=false", "--set", "autoencoder.train.max_steps=6",
               "--set", "dit.train.max_steps=6", "--set", "evaluate.classifier.steps=20",  # a job, not training
               "--workflow-id", "job-wf", "--wait", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    submission = done.stdout.split("submission id: ", 1)[1].split()[0]
    assert f"job {submission}: SUCCEEDED" in done.stdout
    assert "ran evaluate" in done.stdout.replace("  ", " ")  # the job's own logs were streamed

    summary = json.loads((root / "workflows" / "job-wf" / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert [s["name"] for s in summary["steps"]] == ["shard", "autoencoder", "latents", "dit", "evaluate"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["latentflow.workflow_id"] == "job-wf"
    for record in summary["steps"]:
        assert client.get_run(record["mlflow_run_id"]).info.status == "FINISHED", record["name"]

    listed = cli("jobs", "list", "--address", address, env=env)
    assert listed.returncode == 0 and submission in listed.stdout and "job-wf" in listed.stdout
    status = cli("jobs", "status", submission, "--address", address, env=env)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = cli("jobs", "logs", submission, "--address", address, env=env)
    assert "workflow id: job-wf" in logs.stdout
    stopped = cli("jobs", "stop", submission, "--address", address, env=env)
    assert stopped.returncode == 0 and "already finished" in stopped.stdout
    missing = cli("jobs", "status", "raysubmit_nope", "--address", address, env=env)
    assert missing.returncode == 1 and "raysubmit_nope" in missing.stderr


def test_unreachable_server_and_bad_config_fail_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "MLFLOW_"))}
    (port,) = free_ports(1)
    down = cli("jobs", "list", "--address", f"http://127.0.0.1:{port}", env=env, timeout=120)
    assert down.returncode == 1 and f"127.0.0.1:{port}" in down.stderr
    bad = cli("submit", "configs/pipeline/smoke.yaml", "--address", f"http://127.0.0.1:{port}", "--set",
              "dit.trian.max_steps=3", env=env, timeout=120)
    assert bad.returncode == 2 and "dit.trian" in bad.stderr  # rejected before contacting the cluster
