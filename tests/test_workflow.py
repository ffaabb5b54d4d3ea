"""The durable workflow runner: cache keys, resume, verification, concurrency, MLflow runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from components.common.config import RayConfig, TrackingConfig
from components.common.storage import Storage
from pipelines.runtime import run_workflow
from pipelines.workflow import Workflow, cache_key, plan, step
from conftest import REPO
from toy_steps import ToyConfig, fail, produce

pytestmark = pytest.mark.usefixtures("ray_cluster")


def chain(values: dict[str, str] | None = None, sleep: float = 0.0, broken: str | None = None) -> Workflow:
    """a -> b -> c, and d alone."""
    v = {"a": "1", "b": "2", "c": "3", "d": "4", **(values or {})}
    entry = {name: fail if name == broken else produce for name in v}
    return Workflow("toy", [
        step("a", entry["a"], ToyConfig(value=v["a"], sleep_s=sleep)),
        step("d", entry["d"], ToyConfig(value=v["d"], sleep_s=sleep)),
        step("b", entry["b"], ToyConfig(value=v["b"]), inputs=("a",)),
        step("c", entry["c"], ToyConfig(value=v["c"]), inputs=("b",)),
    ])


def run(workflow: Workflow, root, workflow_id=None):
    storage = Storage.from_uri(str(root))
    return run_workflow(workflow, storage, TrackingConfig(), "toy-tests", {"name": "toy"},
                        RayConfig(), workflow_id)


def runs_of(root, name: str) -> int:
    ledger = root / "ledger" / name
    return len(list(ledger.iterdir())) if ledger.exists() else 0


def statuses(result) -> dict[str, str]:
    return {r.name: r.status for r in result.steps}


def test_cache_key_is_stable_across_processes(tmp_path):
    s = step("b", produce, ToyConfig(value="2"))
    here = cache_key(s, {"a": "f" * 64})
    code = ("from pipelines.workflow import cache_key, step; from toy_steps import ToyConfig, produce;"
            "print(cache_key(step('b', produce, ToyConfig(value='2')), {'a': 'f'*64}))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": f"{REPO}/tests:{REPO}"}
                           ).stdout.strip()
    assert here == there and len(here) == 64
    assert cache_key(step("b", produce, ToyConfig(value="3")), {"a": "f" * 64}) != here
    assert cache_key(s, {"a": "e" * 64}) != here
    # resources never change what a step computes, so they stay out of the key
    moved = ToyConfig(value="2")
    moved.resources.num_gpus = 8
    assert cache_key(step("b", produce, moved), {"a": "f" * 64}) == here


def test_rerun_is_cached_and_a_config_change_reruns_exactly_downstream(tmp_path):
    result, summary_uri = run(chain(), tmp_path)
    assert result.ok and set(statuses(result).values()) == {"ran"}
    assert (tmp_path / "steps" / "c").exists()
    c_out = Storage.from_uri(str(tmp_path / "steps" / "c" / result.record("c").cache_key)).read_text("out.txt")
    assert c_out == "c:3[b:2[a:1[]]]"

    again, _ = run(chain(), tmp_path)
    assert set(statuses(again).values()) == {"cached"}
    assert [runs_of(tmp_path, n) for n in "abcd"] == [1, 1, 1, 1]

    changed, _ = run(chain({"b": "22"}), tmp_path)
    assert statuses(changed) == {"a": "cached", "d": "cached", "b": "ran", "c": "ran"}
    assert [runs_of(tmp_path, n) for n in "abcd"] == [1, 2, 2, 1]

    summary = json.loads(Storage.from_uri(str(tmp_path)).read_text(f"workflows/{result.workflow_id}/summary.json"))
    assert summary_uri.endswith(f"workflows/{result.workflow_id}/summary.json")
    assert [s["name"] for s in summary["steps"]] == ["a", "d", "b", "c"]
    assert {s["status"] for s in summary["steps"]} == {"ran"}
    assert all(s["manifest_uri"] and s["mlflow_run_id"] and s["cache_key"] for s in summary["steps"])


def test_plan_runs_nothing_and_predicts_the_cache(tmp_path):
    before = plan(chain(), Storage.from_uri(str(tmp_path)))
    assert [r.status for r in before] == ["would_run"] * 4
    assert not (tmp_path / "ledger").exists()
    run(chain(), tmp_path)
    after = plan(chain({"c": "9"}), Storage.from_uri(str(tmp_path)))
    assert {r.name: r.status for r in after} == {"a": "cached", "d": "cached", "b": "cached", "c": "would_run"}


def test_step_killed_before_its_manifest_reruns_on_resume(tmp_path):
    (tmp_path / "crash").mkdir()
    (tmp_path / "crash" / "b").touch()
    result, _ = run(chain(), tmp_path, workflow_id="resume-me")
    assert statuses(result) == {"a": "ran", "d": "ran", "b": "failed", "c": "skipped"}
    assert "b" in [r.name for r in result.steps if r.error]
    b_dir = tmp_path / "steps" / "b" / result.record("b").cache_key
    assert (b_dir / "out.txt").exists() and not (b_dir / "manifest.json").exists()

    resumed, _ = run(chain(), tmp_path, workflow_id="resume-me")
    assert statuses(resumed) == {"a": "cached", "d": "cached", "b": "ran", "c": "ran"}
    assert (b_dir / "manifest.json").exists()


def test_tampered_output_is_detected_and_the_step_reruns(tmp_path):
    result, _ = run(chain(), tmp_path)
    a_dir = tmp_path / "steps" / "a" / result.record("a").cache_key
    (a_dir / "out.txt").write_text("a:1[] tampered")
    again, _ = run(chain(), tmp_path)
    assert statuses(again)["a"] == "ran"
    assert "cache invalid" in (again.record("a").note or "")
    assert (a_dir / "out.txt").read_text() == "a:1[]"
    # a's bytes are back to what they were, so its digest is unchanged and downstream stays cached
    assert statuses(again)["b"] == "cached"


def test_failure_names_the_step_and_keeps_finished_results(tmp_path):
    result, _ = run(chain(broken="b"), tmp_path)
    assert not result.ok
    assert result.record("b").status == "failed"
    assert "toy failure in b" in result.record("b").error
    assert result.record("c").status == "skipped"
    assert result.record("a").status == "ran" and result.record("d").status == "ran"
    assert (tmp_path / "steps" / "a" / result.record("a").cache_key / "manifest.json").exists()


def test_independent_steps_run_concurrently(tmp_path):
    run(chain(sleep=2.0), tmp_path)
    spans = {}
    for name in "ad":
        (entry,) = (tmp_path / "ledger" / name).iterdir()
        start, end = map(float, entry.read_text().split())
        spans[name] = (start, end)
    (a0, a1), (d0, d1) = spans["a"], spans["d"]
    assert a0 < d1 and d0 < a1, f"a and d did not overlap: {spans}"


def test_each_step_gets_a_nested_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    first, _ = run(chain(), tmp_path)
    second, _ = run(chain(), tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("toy-tests")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_id = {r.info.run_id: r for r in runs}
    assert len(runs) == 2 * (1 + 4)
    for result, hit in ((first, "false"), (second, "true")):
        parent = by_id[result.parent_run_id]
        assert parent.data.tags["latentflow.workflow_id"] == result.workflow_id
        for rec in result.steps:
            r = by_id[rec.mlflow_run_id]
            assert r.data.tags["mlflow.parentRunId"] == result.parent_run_id
            assert r.data.tags["latentflow.step"] == rec.name
            assert r.data.tags["latentflow.cache_key"] == rec.cache_key
            assert r.data.tags["latentflow.cache_hit"] == hit
            assert r.data.params["value"] == {"a": "1", "b": "2", "c": "3", "d": "4"}[rec.name]
            assert r.info.status == "FINISHED"
    b_second = by_id[second.record("b").mlflow_run_id]
    assert b_second.data.tags["latentflow.source_run_id"] == first.record("b").mlflow_run_id
    upstream = json.loads(b_second.data.tags["latentflow.upstream_run_ids"])
    assert upstream == {"a": first.record("a").mlflow_run_id}  # the run that produced b's input
    assert b_second.data.metrics["length"] == len("a:1[]")


def test_only_runs_the_named_steps_and_what_they_need(tmp_path):
    """``latentflow run --only b``: a and b run; c (after b) and d (beside them) are left out."""
    result, _ = run(chain().restricted_to(["b"]), tmp_path)
    assert statuses(result) == {"a": "ran", "b": "ran"}
    assert runs_of(tmp_path, "c") == runs_of(tmp_path, "d") == 0
    with pytest.raises(ValueError, match="no step named 'x' in workflow 'toy'; its steps: a, d, b, c"):
        chain().restricted_to(["x"])
