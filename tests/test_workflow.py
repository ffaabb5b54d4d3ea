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


def test_a_manifest_that_is_not_one_is_an_invalid_result_rerun_with_a_note(tmp_path):
    result, _ = run(chain(), tmp_path)
    broken = {"a": '{"step": "a", "cache_ke', "d": '{"hello": "a foreign json file"}'}
    for name, text in broken.items():
        (tmp_path / "steps" / name / result.record(name).cache_key / "manifest.json").write_text(text)
    planned = {r.name: r for r in plan(chain(), Storage.from_uri(str(tmp_path)))}
    assert planned["a"].status == planned["d"].status == "would_run"
    assert "not a latentflow manifest" in planned["a"].note and "manifest.json is unusable" in planned["d"].note
    again, _ = run(chain(), tmp_path)
    assert statuses(again) == {"a": "ran", "d": "ran", "b": "cached", "c": "cached"}  # the same bytes again
    assert "cache invalid, re-ran" in again.record("a").note and runs_of(tmp_path, "a") == 2


def test_a_root_copied_elsewhere_and_the_original_deleted_is_still_a_cache(tmp_path):
    import shutil

    first, _ = run(chain(), tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    shutil.rmtree(tmp_path / "one")
    again, _ = run(chain(), tmp_path / "two")
    assert set(statuses(again).values()) == {"cached"}
    assert not (tmp_path / "one").exists()  # nothing reads or writes the old place, MLflow included
    manifest = json.loads((tmp_path / "two" / again.record("b").manifest_path).read_text())
    assert manifest["location"] == f"steps/b/{again.record('b').cache_key}"  # relative to the root


def test_two_concurrent_runs_of_one_config_train_every_step_once(tmp_path):
    """Two workflows (different ids, separate MLflow stores) start at once on one root: each step
    runs in one of them; the other waits for its lease and takes the result from cache."""
    import threading

    from pipelines.runtime import run_workflow

    results = {}

    def one(name):
        tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow-{name}.db")
        results[name], _ = run_workflow(chain(sleep=3.0), Storage.from_uri(str(tmp_path / "root")), tracking,
                                        "toy-tests", {"name": "toy"}, RayConfig(), f"wf-{name}")

    threads = [threading.Thread(target=one, args=(name,)) for name in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["x"].ok and results["y"].ok
    for name in "abcd":
        assert runs_of(tmp_path / "root", name) == 1, name  # trained exactly once
        by_run = [results[w].record(name) for w in "xy"]
        assert sorted(r.status for r in by_run) == ["cached", "ran"], name
        waited = next(r for r in by_run if r.status == "cached")
        assert waited.note is None or "produced by" in waited.note
    assert not list((tmp_path / "root").rglob("_lease.json"))  # released


def test_an_expired_lease_is_taken_over_and_a_live_one_shows_in_plan(tmp_path, monkeypatch):
    import time

    from components.common.lease import LEASE_NAME

    root = Storage.from_uri(str(tmp_path))
    keys = {r.name: r.cache_key for r in plan(chain(), root)}
    holder = {"workflow_id": "gone", "attempt": "x", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 300}
    root.write_text(f"steps/a/{keys['a']}/{LEASE_NAME}", json.dumps(holder))
    planned = {r.name: r for r in plan(chain(), root)}
    assert "running now in workflow 'gone' (host elsewhere" in planned["a"].note
    root.write_text(f"steps/a/{keys['a']}/{LEASE_NAME}", json.dumps({**holder, "expires_at": time.time() - 1}))
    result, _ = run(chain(), tmp_path)  # its holder died long ago: taken over, the step runs
    assert statuses(result)["a"] == "ran" and runs_of(tmp_path, "a") == 1
