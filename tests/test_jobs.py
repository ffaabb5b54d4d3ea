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
import subprocess
import sys

import pytest

from conftest import REPO
from ray_nodes import RayNode, free_ports, node_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """(dashboard address, env with the token) of a fresh Ray head on 127.0.0.1; stopped afterwards."""
    home = tmp_path_factory.mktemp("head")
    token = home / "token"
    token.write_text(secrets.token_hex(32))
    env = node_env(token)
    head = RayNode(home, env, num_cpus=2, dashboard=True)
    try:
        head.wait_for_dashboard()
        yield head.dashboard_url, env
    finally:
        head.stop()


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
               "--workflow-id", "job-wf", env=env)  # follows the job to its end by default, as `ray job submit`
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

    # the address as `ray job` reads it: --address, then RAY_API_SERVER_ADDRESS, then RAY_ADDRESS
    (closed,) = free_ports(1)
    elsewhere = f"http://127.0.0.1:{closed}"
    listed = cli("jobs", "list", "--json", env={**env, "RAY_ADDRESS": address})
    assert listed.returncode == 0, listed.stderr[-2000:]
    (row,) = [r for r in json.loads(listed.stdout) if r["submission_id"] == submission]
    assert row["workflow_id"] == "job-wf" and row["status"] == "SUCCEEDED"
    status = cli("jobs", "status", submission, env={**env, "RAY_API_SERVER_ADDRESS": address, "RAY_ADDRESS": elsewhere})
    assert status.stdout.strip() == "SUCCEEDED", status.stderr[-2000:]
    # Ray's own client would take the variable over the address it is given (ray-project/ray#41590)
    logs = cli("jobs", "logs", submission, "--address", address, env={**env, "RAY_API_SERVER_ADDRESS": elsewhere})
    assert "workflow id: job-wf" in logs.stdout, logs.stderr[-2000:]
    stopped = cli("jobs", "stop", submission, "--address", address, env=env)
    assert stopped.returncode == 0 and "already finished" in stopped.stdout
    missing = cli("jobs", "status", "raysubmit_nope", "--address", address, env=env)
    assert missing.returncode == 1 and "raysubmit_nope" in missing.stderr

    # --no-wait detaches, naming the way to follow; the detached job is stopped while it runs
    detached = cli("submit", "configs/pipeline/smoke.yaml", "--no-wait", "--set", f"storage.root={tmp_path / 'two'}",
                   env={**env, "RAY_API_SERVER_ADDRESS": address})
    assert detached.returncode == 0, detached.stderr[-2000:]
    second = detached.stdout.split("submission id: ", 1)[1].split()[0]
    assert f"latentflow jobs logs {second} --follow\n" in detached.stdout  # the variable names the server again
    stopping = cli("jobs", "stop", second, "--address", address, env=env)
    assert stopping.returncode == 0 and "stop requested" in stopping.stdout
    cli("jobs", "logs", second, "--follow", "--address", address, env=env)  # returns once the job has ended
    assert cli("jobs", "status", second, "--address", address, env=env).stdout.strip() == "STOPPED"


def test_unreachable_server_and_bad_config_fail_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "AWS_", "MLFLOW_"))}
    nowhere = cli("jobs", "list", env=env, timeout=120)
    assert nowhere.returncode == 2, nowhere.stderr
    assert all(name in nowhere.stderr for name in ("--address", "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"))
    (port,) = free_ports(1)
    down = cli("jobs", "list", "--address", f"http://127.0.0.1:{port}", env=env, timeout=120)
    assert down.returncode == 1 and f"127.0.0.1:{port}" in down.stderr
    bad = cli("submit", "configs/pipeline/smoke.yaml", "--address", f"http://127.0.0.1:{port}", "--set",
              "dit.trian.max_steps=3", env=env, timeout=120)
    assert bad.returncode == 2 and "dit.trian" in bad.stderr  # rejected before contacting the cluster
