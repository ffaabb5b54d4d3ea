"""Shared fixtures: real services on 127.0.0.1, started once per test session.

- ``s3_server``: moto's S3-compatible server (ThreadedMotoServer) with dummy credentials in the env;
- ``ray_cluster``: a real local Ray (2 CPUs), started after the S3 env is set so workers inherit it;
- ``mlflow_server``: a real ``mlflow server`` process (SQLite backend, artifacts in the moto bucket).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACT_BUCKET = "latentflow-mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test: returns its name."""
    import boto3

    name = f"lf-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}})
    yield ray
    ray.shutdown()


def wait_for_http(url: str, proc: subprocess.Popen, log_path, timeout_s: float, what: str) -> None:
    """Until ``url`` answers; a server that exits or stays silent fails with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not answer {url}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    import boto3

    boto3.client("s3").create_bucket(Bucket=ARTIFACT_BUCKET)
    workdir = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
           "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/artifacts", "--workers", "1"]
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", proc, workdir / "server.log", 90, "mlflow server")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and on a busy 2-core machine two OpenMP threads that spin
    at every barrier made each step ~50x slower (measured: 14 ms vs 0.7-1 s). Modules that train
    tiny models in-process use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)



def latentflow(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a fresh process; no S3/MLflow/Ray settings leak in from the
    test process except those in ``env``."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})})


def s3_environment() -> dict[str, str]:
    """The (moto) S3 settings of this test session, for a CLI or a Ray node to reach the bucket."""
    return {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_S3_"))}


@pytest.fixture(scope="session")
def smoke_on_s3(mlflow_server, s3_server):
    """The smoke pipeline run once for the whole session, as a user runs it: `latentflow run`,
    storage on S3 (moto), tracking on a real mlflow server whose artifacts live in S3. Tests that
    need a finished workflow share it: (root URI, S3 env, the run's CompletedProcess)."""
    import boto3

    bucket = f"lf-smoke-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/smoke"
    # MLflow samples system metrics every 10 s; the smoke steps train for seconds
    env = {**s3_environment(), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    first = latentflow("run", str(REPO / "configs" / "pipeline" / "smoke.yaml"), "--set", f"storage.root={root}",
                       "--set", f"tracking.uri={mlflow_server}", "--workflow-id", "wf-one", env=env, timeout=600)
    return root, env, first
