"""The smoke pipeline end to end: through the CLI, and against a real mlflow server with S3 artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from conftest import ARTIFACT_BUCKET, REPO
from pipelines.config import load_pipeline_config
from pipelines.runtime import run_pipeline

SMOKE = REPO / "configs" / "pipeline" / "smoke.yaml"


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}  # no S3/MLflow/Ray from the tests
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})})


def test_help_explains_the_commands():
    out = cli("--help")
    assert out.returncode == 0
    assert "run" in out.stdout and "plan" in out.stdout
    run_help = cli("run", "--help").stdout
    assert "--workflow-id" in run_help and "--set" in run_help


def test_plan_validates_the_production_recipe_without_running_anything():
    out = cli("plan", "configs/pipeline/imagenet256.yaml")
    assert out.returncode == 0, out.stderr
    assert "shard" in out.stdout and "workers=64" in out.stdout


def test_bad_key_exits_nonzero_naming_the_key(tmp_path):
    out = cli("run", str(SMOKE), "--set", "shard.imagesize=3", "--set", f"storage.root={tmp_path}")
    assert out.returncode == 2
    assert "shard.imagesize" in out.stderr and "smoke.yaml" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing started


def test_smoke_runs_then_serves_everything_from_cache(tmp_path):
    root = tmp_path / "out"
    first = cli("run", str(SMOKE), "--set", f"storage.root={root}", "--workflow-id", "wf-one")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.splitlines()[0] == "workflow id: wf-one"
    summary = json.loads((root / "workflows" / "wf-one" / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [("shard", "ran")]
    manifest = json.loads(Path(summary["steps"][0]["manifest_uri"]).read_text())
    assert manifest["metrics"]["num_train"] + manifest["metrics"]["num_val"] == 600
    assert any(f["path"].endswith(".tar") for f in manifest["files"])

    second = cli("run", str(SMOKE), "--set", f"storage.root={root}")
    assert second.returncode == 0, second.stderr
    assert "cached" in second.stdout and " ran " not in second.stdout
    assert "Started a local Ray" not in second.stderr  # a fully cached run never waits for Ray


def test_failing_step_exits_nonzero_naming_the_step(tmp_path):
    missing = tmp_path / "no-such-folder"
    out = cli("run", str(SMOKE), "--set", f"storage.root={tmp_path / 'out'}", "--set", f"shard.source={missing}")
    assert out.returncode == 1
    assert "step 'shard' failed" in out.stderr and str(missing) in out.stderr


@pytest.mark.integration
def test_smoke_against_mlflow_server_with_s3_storage_and_artifacts(ray_cluster, mlflow_server, s3_bucket):
    from mlflow.tracking import MlflowClient

    cfg = load_pipeline_config(SMOKE, [f"storage.root=s3://{s3_bucket}/smoke", f"tracking.uri={mlflow_server}"])
    result, summary_uri = run_pipeline(cfg, "wf-server")
    assert result.ok, [r.error for r in result.steps]
    assert summary_uri == f"s3://{s3_bucket}/smoke/workflows/wf-server/summary.json"

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("latentflow-smoke")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[result.parent_run_id]
    shard = runs[result.record("shard").mlflow_run_id]
    assert parent.data.tags["latentflow.workflow_id"] == "wf-server"
    assert shard.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert shard.data.tags["latentflow.cache_hit"] == "false"
    assert shard.data.params["source"] == "builtin:mnist"
    assert shard.data.metrics["num_train"] + shard.data.metrics["num_val"] == 600
    artifacts = {a.path for a in client.list_artifacts(shard.info.run_id)}
    assert {"contact_sheet.png", "manifest.json", "config.json"} <= artifacts
    # the artifacts really live in the S3 bucket behind the server
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=ARTIFACT_BUCKET)["Contents"]]
    assert any(k.endswith(f"{shard.info.run_id}/artifacts/contact_sheet.png") for k in keys)
    # and the shards in the storage bucket
    shard_keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(k.startswith("smoke/steps/shard/") and k.endswith(".tar") for k in shard_keys)
