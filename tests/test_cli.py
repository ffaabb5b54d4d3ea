"""The CLI's habits from the tools people know: --version, --json documents, the help's config order,
and `runs` finding the demo's storage root by itself. Each command runs as a user runs it, in a fresh
process (about 1-3 s each); the job commands are in test_jobs.py, against a real job server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version

import pytest
import typer

from conftest import REPO

SMOKE = REPO / "configs" / "pipeline" / "smoke.yaml"


def cli(*args: str, cwd=REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = str(REPO)  # from another working directory, as the installed script would find it
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_version_and_the_config_order_in_help():
    out = cli("--version")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert out.returncode == 0 and out.stdout == f"latentflow {version('latentflow')}\n"
    assert version("latentflow") == pyproject
    words = cli("plan", "--help").stdout
    for word in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "last wins", "--json"):
        assert word in words, word


def test_plan_json_is_one_document_with_every_step(tmp_path):
    from pipelines.config import load_pipeline_config
    from pipelines.latent_diffusion import build_workflow

    root = tmp_path / "out"
    out = cli("plan", str(SMOKE), "--set", f"storage.root={root}", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)  # the whole of stdout, nothing else on it
    workflow = build_workflow(load_pipeline_config(SMOKE, [f"storage.root={root}"]))
    assert [s["step"] for s in plan["steps"]] == [s.name for s in workflow.steps]
    assert plan["pipeline"] == "smoke" and plan["cache_checked"] and plan["storage"] == str(root)
    first = plan["steps"][0]
    assert first["would"] == "run" and len(first["cache_key"]) == 64 and first["resources"]["num_workers"] >= 1
    assert all(s["would"] == "run" for s in plan["steps"])  # an empty root: nothing cached


def summary(root, workflow_id: str, started: str) -> None:
    path = root / "workflows" / workflow_id / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"workflow_id": workflow_id, "pipeline": root.name, "status": "succeeded",
                                "started_at": started, "ended_at": started,
                                "steps": [{"name": "shard", "status": "ran"}, {"name": "dit", "status": "cached"}]}))


def test_runs_finds_the_demo_root_without_storage(tmp_path):
    """`runs` looks where `inspect` and `sample` look: ./outputs and ./outputs/* (the demo's
    ./outputs/mnist, configs/pipeline/mnist.yaml's storage.root)."""
    empty = cli("runs", "--json", cwd=tmp_path)
    assert empty.returncode == 0 and json.loads(empty.stdout) == [] and "--storage" in empty.stderr
    summary(tmp_path / "outputs" / "mnist", "wf-demo", "2026-12-02T10:00:00+00:00")
    summary(tmp_path / "outputs" / "smoke", "wf-smoke", "2026-12-01T10:00:00+00:00")
    listed = cli("runs", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = json.loads(listed.stdout)
    assert [(r["workflow_id"], r["ran"], r["cached"]) for r in rows] == [("wf-demo", 1, 1), ("wf-smoke", 1, 1)]
    assert rows[0]["storage"] == str(tmp_path / "outputs" / "mnist")
    table = cli("runs", cwd=tmp_path)
    assert table.returncode == 0 and "wf-demo" in table.stdout and "succeeded" in table.stdout
    inspected = cli("inspect", "wf-demo", "--json", cwd=tmp_path)  # the same search, shared
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["workflow_id"] == "wf-demo"


def sample_options() -> set[str]:
    """Every option name of `latentflow sample`, read from the console script's app (pyproject's entry)."""
    from pipelines.cli import app

    sample_command = typer.main.get_command(app).commands["sample"]
    return {name for param in sample_command.params for name in param.opts}


def test_an_invalid_sr_setting_names_the_real_option(monkeypatch):
    import components.superres.load
    import pipelines.sample
    from components.superres.config import SuperResSamplingConfig

    # the stage's own settings are not the point: loading applies the overrides, as load_superres does
    monkeypatch.setattr(pipelines.sample, "step_manifest", lambda summary, name, uri: None)
    monkeypatch.setattr(components.superres.load, "load_superres",
                        lambda manifest, device, **overrides: SuperResSamplingConfig(**overrides))
    summary = {"workflow_id": "w", "steps": [{"name": "superres_1"}]}
    with pytest.raises(pipelines.sample.BadFlag, match="--sr-noise-cond-aug-level: ") as error:
        pipelines.sample.superres_stages(summary, "file:///summary.json", "cpu", noise_cond_aug_level=2.0)
    assert "--sr-noise_cond_aug_level" not in str(error.value)  # the field name is no option
    assert "--sr-noise-cond-aug-level" in sample_options()
