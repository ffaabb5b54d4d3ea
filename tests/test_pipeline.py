"""The smoke pipeline end to end: through the CLI, and against a real mlflow server with S3 artifacts."""

from __future__ import annotations

import json
import re

import boto3
import pytest
from PIL import Image

from conftest import ARTIFACT_BUCKET, REPO, latentflow
from components.common.step import read_manifest_at
from components.common.storage import Storage

SMOKE = REPO / "configs" / "pipeline" / "smoke.yaml"
# step -> artifacts its MLflow run must show besides its manifest and config
EXPECTED_STEPS = {
    "shard": {"contact_sheet.png"},
    "superres_1": {"superres_samples.png", "superres.json"},
    "inception_reference": {"inception_reference.json"},
    "autoencoder": {"reconstructions.png", "autoencoder.json"},
    "latents": set(),
    "dit": {"samples.png", "dit.json"},
    "distill": {"samples.png", "distill.json"},
    "evaluate": {"eval_samples.png", "evaluation.json", "cascade_samples.png", "quality_vs_steps.png",
                 "quality_vs_steps.json"},
}


cli = latentflow


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


def test_failing_step_exits_nonzero_naming_the_step(tmp_path):
    missing = tmp_path / "no-such-folder"
    out = cli("run", str(SMOKE), "--set", f"storage.root={tmp_path / 'out'}", "--set", f"shard.source={missing}")
    assert out.returncode == 1
    assert "step 'shard' failed" in out.stderr and str(missing) in out.stderr


def test_unreadable_storage_stops_plan_and_run_naming_the_object(tmp_path):
    """An S3 endpoint that does not answer is "cannot tell", never "no result": plan and run exit 1
    naming the object, and run starts no step (before, plan printed "run" for every step)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_DEFAULT_REGION": "us-east-1", "LATENTFLOW_S3_MAX_ATTEMPTS": "1"}
    args = (str(SMOKE), "--set", "storage.root=s3://lf-unreachable/smoke", "--set",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    planned = cli("plan", *args, env=env)
    assert planned.returncode == 1, planned.stdout[-2000:] + planned.stderr[-2000:]
    assert "s3://lf-unreachable/smoke/steps/shard/" in planned.stderr and "unreachable" in planned.stderr
    assert "[green]run" not in planned.stdout and " run " not in planned.stdout
    ran = cli("run", *args, env=env)
    assert ran.returncode == 1 and "s3://lf-unreachable/smoke/" in ran.stderr, ran.stderr[-2000:]
    assert "unreachable" in ran.stderr and "Traceback" not in ran.stderr
    assert "start" not in ran.stdout  # no step started


def test_an_unreachable_tracking_server_is_a_named_error_before_any_work(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = cli("run", str(SMOKE), "--set", f"storage.root={tmp_path / 'out'}", "--set",
              f"tracking.uri=http://127.0.0.1:{port}", timeout=120)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr and "start" not in out.stdout  # no step started
    assert not (tmp_path / "out" / "steps").exists()


@pytest.mark.integration
def test_smoke_through_the_cli_on_s3_with_an_mlflow_server_then_from_cache(mlflow_server, smoke_on_s3, tmp_path):
    """The whole smoke pipeline as a user runs it (``smoke_on_s3``): `latentflow run`, storage on S3
    (moto server), tracking on a real mlflow server whose artifacts live in S3; then again, all from cache."""
    from mlflow.tracking import MlflowClient

    root, s3_env, first = smoke_on_s3
    args = ("run", str(SMOKE), "--set", f"storage.root={root}", "--set", f"tracking.uri={mlflow_server}")
    storage = Storage.from_uri(root)
    summary, steps, shard = check_the_first_run(first, storage)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("latentflow-smoke")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    check_the_step_runs(client, exp, runs, summary, steps, shard)
    sample_args = ("sample", "--workflow-id", "wf-one", "--storage", root, "--labels", "3,7",
                   "--per-label", "2", "--steps", "3", "--out")
    out = check_sampling_from_the_workflow_id(sample_args, s3_env, tmp_path)
    evaluation = runs[steps["evaluate"]["mlflow_run_id"]].data.metrics
    check_the_cascade(evaluation, runs, steps, sample_args, s3_env, tmp_path)
    check_the_distilled_student(client, runs, steps, evaluation, root, s3_env, tmp_path)
    check_inspect_and_runs(root, s3_env, mlflow_server, evaluation)
    check_a_second_run_from_cache(args, s3_env, storage)
    retrain_args = ("retrain", *args[1:])
    check_retrain_registers_and_promotes(client, exp, retrain_args, s3_env, steps, evaluation)
    check_the_registered_models_sample(mlflow_server, root, s3_env, tmp_path, out)
    check_a_warm_started_dit(client, retrain_args, s3_env, storage)


def check_the_first_run(first, storage: Storage):
    """The run succeeded with every step run (not cached), quietly; the shard manifest verifies.
    Returns (summary, steps by name, the shard manifest)."""
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.splitlines()[0] == "workflow id: wf-one"
    assert_a_quiet_console(first.stdout, storage, "wf-one")
    summary = json.loads(storage.read_text("workflows/wf-one/summary.json"))
    assert summary["status"] == "succeeded"
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(EXPECTED_STEPS) and {s["status"] for s in steps.values()} == {"ran"}

    shard = read_manifest_at(steps["shard"]["manifest_uri"])
    assert shard.metrics["num_train"] + shard.metrics["num_val"] == 600
    assert not shard.verify()
    return summary, steps, shard


def check_the_step_runs(client, exp, runs, summary, steps, shard) -> None:
    """A nested MLflow run per step under the workflow's parent, with its artifacts in the S3 bucket."""
    parent = runs[summary["mlflow_parent_run_id"]]
    assert parent.data.tags["latentflow.workflow_id"] == "wf-one"
    for name, record in steps.items():
        run = runs[record["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["latentflow.cache_hit"] == "false"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"manifest.json", "config.json"} <= artifacts, name
        assert EXPECTED_STEPS[name] <= artifacts, name
    shard_run = runs[steps["shard"]["mlflow_run_id"]]
    assert shard_run.data.params["source"] == "builtin:mnist"
    assert_looks_like_training(client, exp, runs, steps, shard)
    # the artifacts really live in the S3 bucket behind the server
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=ARTIFACT_BUCKET)["Contents"]]
    assert any(k.endswith(f"{shard_run.info.run_id}/artifacts/contact_sheet.png") for k in keys)


def check_sampling_from_the_workflow_id(sample_args, s3_env, tmp_path):
    """`latentflow sample` reproduces images from the workflow id alone; returns their folder."""
    out = tmp_path / "samples"
    sampled = cli(*sample_args, str(out), env=s3_env)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == ["3/0.png", "3/1.png", "7/0.png", "7/1.png", "grid.png"]
    # the DiT samples at the base resolution, autoencoder.image_size: 16 px below the shards' 32
    assert Image.open(out / "3" / "0.png").size == (16, 16) and Image.open(out / "3" / "0.png").mode == "L"
    again = cli(*sample_args, str(tmp_path / "again"), env=s3_env)
    assert again.returncode == 0 and (tmp_path / "again" / "7" / "1.png").read_bytes() == (out / "7" / "1.png").read_bytes()
    return out


def check_the_cascade(evaluation, runs, steps, sample_args, s3_env, tmp_path) -> None:
    """... and through the cascade, at the super-resolution stage's 32 px."""
    assert 0 <= evaluation["cascade_sample_accuracy"] <= 1 and evaluation["cascade_frechet_distance"] >= 0
    # FID/KID on Inception features at the base 16 px and the cascade's 32 px, beside the real floor
    for prefix in ("", "cascade_"):
        assert evaluation[f"{prefix}fid"] > evaluation[f"{prefix}fid_real_baseline"] > 0, prefix
        assert evaluation[f"{prefix}kid_std"] >= 0 and f"{prefix}kid_real_baseline" in evaluation, prefix
    assert runs[steps["superres_1"]["mlflow_run_id"]].data.metrics["psnr"] > 5
    cascade_out = tmp_path / "cascade"
    stacked = cli(*sample_args[:-1], "--step", "cascade", "--sr-steps", "2", "--out", str(cascade_out), env=s3_env)
    assert stacked.returncode == 0, stacked.stderr[-3000:]
    assert Image.open(cascade_out / "7" / "1.png").size == (32, 32)
    assert Image.open(cascade_out / "grid.png").size[1] > 2 * 32
    bad = cli(*sample_args[:-1], "--step", "cascade", "--sr-handoff", "truncated", "--out", str(tmp_path / "x"),
              env=s3_env)
    assert bad.returncode == 2 and "latent space" in bad.stderr


def check_the_distilled_student(client, runs, steps, evaluation, root, s3_env, tmp_path) -> None:
    """The distilled student: one progressive round (4 -> 2 steps) with its own child run and grid."""
    distill_run = runs[steps["distill"]["mlflow_run_id"]]
    rounds = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == distill_run.info.run_id]
    assert [r.info.run_name for r in rounds] == ["round 1: 4 -> 2 steps"]
    assert {"samples.png", "distill.json"} <= {a.path for a in client.list_artifacts(rounds[0].info.run_id)}
    for name in ("teacher_4step_sample_accuracy", "teacher_2step_frechet_distance", "student_2step_sample_accuracy",
                 "student_2step_images_per_s"):
        assert name in evaluation, name
    student_args = ("sample", "--workflow-id", "wf-one", "--storage", root, "--labels", "3,7", "--per-label", "2")
    student = cli(*student_args, "--step", "distill", "--out", str(tmp_path / "student"), env=s3_env)
    assert student.returncode == 0, student.stderr[-3000:]
    assert "2 steps" in student.stdout and Image.open(tmp_path / "student" / "3" / "0.png").size == (16, 16)
    cascaded = cli(*student_args, "--step", "cascade", "--base", "distill", "--sr-steps", "2", "--out",
                   str(tmp_path / "student_cascade"), env=s3_env)
    assert cascaded.returncode == 0, cascaded.stderr[-3000:]
    assert Image.open(tmp_path / "student_cascade" / "7" / "1.png").size == (32, 32)
    refused = cli(*student_args, "--step", "distill", "--guidance", "2", "--out", str(tmp_path / "y"), env=s3_env)
    assert refused.returncode == 2 and "--guidance" in refused.stderr


def check_inspect_and_runs(root, s3_env, mlflow_server, evaluation) -> None:
    """`latentflow inspect` answers from the workflow id alone (storage + the MLflow server)."""
    inspected = cli("inspect", "wf-one", "--storage", root, "--json", env={**s3_env, "MLFLOW_TRACKING_URI": mlflow_server})
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    view = json.loads(inspected.stdout)
    assert view["status"] == "succeeded" and [s["step"] for s in view["steps"]] == list(EXPECTED_STEPS)
    by_step = {s["step"]: s for s in view["steps"]}
    assert by_step["evaluate"]["metrics"]["sample_accuracy"] == evaluation["sample_accuracy"]
    assert by_step["dit"]["mlflow_status"] == "FINISHED" and "dit.json" in by_step["dit"]["mlflow_artifacts"]
    assert all(s["status"] == "ran" and not s["cached"] for s in view["steps"])
    assert by_step["dit"]["location"].startswith(root) and by_step["shard"]["metrics"]["num_train"] > 0
    listed = cli("runs", "--storage", root, env=s3_env)
    assert listed.returncode == 0 and "wf-one" in listed.stdout and "succeeded" in listed.stdout


def check_a_second_run_from_cache(args, s3_env, storage: Storage) -> None:
    second = cli(*args, env=s3_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("cached") >= len(EXPECTED_STEPS) and " ran " not in second.stdout
    second_id = second.stdout.splitlines()[0].split()[-1]
    assert "pid=" not in workflow_log(storage, second_id)  # a fully cached run never waits for Ray workers


def check_retrain_registers_and_promotes(client, exp, retrain_args, s3_env, steps, evaluation) -> None:
    """`latentflow retrain`: nothing re-runs; the models are registered and, with no champion yet, promoted."""
    promoted = cli(*retrain_args, env=s3_env)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert " ran " not in promoted.stdout and "PROMOTED to champion: no champion yet" in promoted.stdout
    champion = client.get_model_version_by_alias("smoke-dit", "champion")
    dit_manifest = read_manifest_at(steps["dit"]["manifest_uri"])
    assert champion.source == f"models:/{dit_manifest.info['mlflow_model_id']}"  # the step's LoggedModel
    assert champion.tags["latentflow.cache_key"] == steps["dit"]["cache_key"]
    assert float(champion.tags["eval.sample_accuracy"]) == evaluation["sample_accuracy"]
    for name in ("smoke-autoencoder", "smoke-distill", "smoke-superres_1"):
        assert client.get_model_version_by_alias(name, "champion").tags["latentflow.step"] == name.split("-", 1)[1]
    kept = cli(*retrain_args, env=s3_env)
    assert "kept the champion: already the champion" in kept.stdout, kept.stdout[-2000:]
    assert len(client.search_model_versions("name='smoke-dit'")) == 1  # the same cache key: no new version
    parent_runs = client.search_runs([exp.experiment_id], "tags.`latentflow.promotion` = 'kept'")
    assert parent_runs and "promotion.json" in {a.path for a in client.list_artifacts(parent_runs[0].info.run_id)}


def check_the_registered_models_sample(mlflow_server, root, s3_env, tmp_path, out) -> None:
    """The registered DiT samples what wf-one's did; the registered student too, and as a pyfunc."""
    registered = cli("sample", "--model", "models:/smoke-dit/1", "--tracking-uri", mlflow_server, "--labels",
                     "3", "--per-label", "2", "--steps", "3", "--out", str(tmp_path / "registered"), env=s3_env)
    assert registered.returncode == 0, registered.stderr[-3000:]
    assert (tmp_path / "registered" / "3" / "1.png").read_bytes() == (out / "3" / "1.png").read_bytes()  # wf-one's DiT
    after = json.loads(cli("inspect", "wf-one", "--storage", root, "--json",
                           env={**s3_env, "MLFLOW_TRACKING_URI": mlflow_server}).stdout)
    dit_version = next(v for v in after["registered_models"] if v["name"] == "smoke-dit")
    assert dit_version["aliases"] == ["champion"] and dit_version["step"] == "dit"
    fast = cli("sample", "--model", "models:/smoke-distill@champion", "--tracking-uri", mlflow_server, "--labels",
               "7", "--per-label", "1", "--out", str(tmp_path / "registered_student"), env=s3_env)
    assert fast.returncode == 0 and (tmp_path / "registered_student" / "7" / "0.png").exists(), fast.stderr[-3000:]
    # ... and the same student as a pyfunc model, in this process (served: tests/test_serving.py)
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server)
    try:
        answer = mlflow.pyfunc.load_model("models:/smoke-distill@champion").predict(pd.DataFrame({"label": [7]}))
    finally:
        mlflow.set_tracking_uri(None)
    assert answer["image"][0] == (tmp_path / "registered_student" / "7" / "0.png").read_bytes()


def check_a_warm_started_dit(client, retrain_args, s3_env, storage: Storage) -> None:
    """A warm-started DiT (from the champion) re-runs the DiT and what follows; the gate compares
    (without the distill step, which would only re-run too: CI time)."""
    warm = cli(*retrain_args, "--set", "dit.warm_start=models:/smoke-dit@champion", "--set", "distill=null",
               "--workflow-id", "wf-warm", env=s3_env)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "ran dit" in " ".join(warm.stdout.split()) and "cached autoencoder" in " ".join(warm.stdout.split())
    # the real images' Inception features are computed once per dataset version: served from cache
    assert "ran evaluate" in " ".join(warm.stdout.split())
    assert "cached inception_reference" in " ".join(warm.stdout.split())
    assert re.search(r"sample_accuracy \S+ (beats|does not beat) \S+", warm.stdout), warm.stdout[-1500:]
    warm_summary = json.loads(storage.read_text("workflows/wf-warm/summary.json"))
    warm_dit = next(r for r in warm_summary["steps"] if r["name"] == "dit")
    assert client.get_run(warm_dit["mlflow_run_id"]).data.tags["latentflow.warm_start_version"] == "smoke-dit/1"


def workflow_log(storage: Storage, workflow_id: str) -> str:
    logs = [rel for rel in storage.list(f"workflows/{workflow_id}/logs/") if rel.endswith(".log")]
    assert len(logs) == 1, logs
    return storage.read_text(logs[0])


def assert_a_quiet_console(stdout: str, storage: Storage, workflow_id: str) -> None:
    """`latentflow run` in a non-interactive terminal: a line per step event, a few progress lines,
    the table; what Ray, the workers and DeepSpeed print is in the workflow's log file instead."""
    lines = stdout.splitlines()
    assert len(lines) < 60, stdout
    words = [" ".join(line.split()) for line in lines]
    for step in EXPECTED_STEPS:
        assert any(w.startswith(f"start {step} ") for w in words) and any(w.startswith(f"ran {step} ") for w in words)
    progress = [w for w in words if "%" in w and " loss " in w and " img/s" in w]
    assert progress, stdout  # the training steps' own reports: step, loss, throughput
    assert "RayTrainWorker" not in stdout and "TrainController" not in stdout
    log_line = next(w for w in words if w.startswith("log: "))
    assert log_line.split()[1].startswith(storage.uri(f"workflows/{workflow_id}/logs/"))
    log = workflow_log(storage, workflow_id)
    assert "(RayTrainWorker pid=" in log and "latentflow.progress" in log


def assert_looks_like_training(client, exp, runs, steps, shard) -> None:
    """What the MLflow UI shows of the smoke workflow: a model-training experiment whose step runs
    name their data set, carry system metrics, grids by step, user and source tags, and models."""
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    dit_run = client.get_run(steps["dit"]["mlflow_run_id"])
    datasets = {d.dataset.name: d for d in dit_run.inputs.dataset_inputs}
    assert set(datasets) == {"smoke-shard", "smoke-latents"}
    assert datasets["smoke-shard"].dataset.digest == shard.digest[:16]
    assert json.loads(datasets["smoke-shard"].dataset.source)["uri"] == shard.output_uri
    assert {d.dataset.name for d in client.get_run(steps["superres_1"]["mlflow_run_id"]).inputs.dataset_inputs} == \
        {"smoke-shard"}
    for step in ("autoencoder", "dit", "superres_1"):
        metrics = client.get_run(steps[step]["mlflow_run_id"]).data.metrics
        assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics, step
    series = [a.path for a in client.list_artifacts(dit_run.info.run_id, "images")]
    assert len([p for p in series if "samples+step+8+" in p]) >= 1 and any("samples+step+16+" in p for p in series), \
        series  # the grid at the checkpoint (step 8) and at the end (16)
    assert dit_run.data.tags["mlflow.user"] and dit_run.data.tags["mlflow.source.type"] == "LOCAL"
    assert dit_run.data.tags["mlflow.source.name"].startswith("latentflow run ")
    for step in ("autoencoder", "dit", "distill", "superres_1"):
        outputs = client.get_run(steps[step]["mlflow_run_id"]).outputs.model_outputs
        assert len(outputs) == 1, step
        model = client.get_logged_model(outputs[0].model_id)
        assert model.source_run_id == steps[step]["mlflow_run_id"], step
        assert (model.model_type == "latentflow-generator") == (step in ("dit", "distill")), step
