"""Two Ray nodes for real: a head and a worker node on this machine (distinct node ids, each its own
raylet), storage on the moto S3 server as a real cluster's shared storage is. The smoke pipeline's
DiT and super-resolution steps run on it with their workers spread over both nodes; mid-step the
worker node is killed, and both steps restart from their checkpoints on the node that is left.

Checked: the workers sat on two nodes; every training sample of an epoch was consumed exactly
once across the workers (the trainer's data audit: what the final weights saw, restarts
included); checkpoints and the final manifests are in S3; the steps resumed from a checkpoint
(not from scratch) and ended at max_steps.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import pytest

from components.common.step import read_manifest_at
from components.common.storage import Storage
from conftest import REPO
from ray_nodes import RayNode, node_env, wait_for_nodes

pytestmark = pytest.mark.integration

STEPS = {"dit": "dit", "superres_1": "superres.0"}  # step -> its config section
# superres_1 runs ~10 steps a second here once started: 240 keep it running until the DiT has its first
# checkpoint too, when the node is killed (at 60 it once finished first and had nothing to resume)
MAX_STEPS = {"dit": 120, "superres_1": 240}
CHECKPOINT_EVERY = {"dit": 20, "superres_1": 20}
MICRO_BATCH = {"dit": 64 // 2, "superres_1": 16 // 2}  # smoke.yaml's global batches over 2 workers


def overrides(root: str, mlflow_server: str, address: str) -> list[str]:
    sets = [f"storage.root={root}", f"tracking.uri={mlflow_server}", f"ray.address={address}"]
    for step, section in STEPS.items():
        sets += [f"{section}.train.seed=1",  # a new cache key: these two steps run again, upstream is cached
                 f"{section}.train.max_steps={MAX_STEPS[step]}",
                 f"{section}.train.checkpoint_every={CHECKPOINT_EVERY[step]}", f"{section}.train.audit_data=true",
                 f"{section}.resources.placement_strategy=SPREAD", f"{section}.resources.max_retries=1"]
    return [arg for s in sets for arg in ("--set", s)]


def checkpoints(root: Storage, step: str) -> set[str]:
    return {rel for rel in root.list(f"steps/{step}") if rel.endswith("train_state.json")}


def audit(step_dir: Storage) -> tuple[dict[int, list[str]], set[str]]:
    """(epoch -> keys consumed, node ids of the workers) from the step's data audit."""
    keys, nodes = {}, set()
    for rel in step_dir.list("_data_audit"):
        record = json.loads(step_dir.read_text(rel))
        nodes.add(record["node_id"])
        for batch in record["batches"]:
            keys.setdefault(batch["epoch"], []).extend(batch["keys"])
    return keys, nodes


def test_dit_and_sr_steps_span_two_nodes_and_survive_losing_one(smoke_on_s3, mlflow_server, tmp_path):
    root_uri, s3_env, first = smoke_on_s3
    assert first.returncode == 0, first.stderr[-3000:]
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    # the nodes' workers import the project and reach S3 from their environment, as on a real cluster
    env = node_env(token, {**s3_env, "PYTHONPATH": str(REPO)})
    head = RayNode(tmp_path, env, num_cpus=2)
    worker = None
    try:
        worker = RayNode(tmp_path, env, num_cpus=2, head_port=head.gcs_port)
        assert len(wait_for_nodes(head.address, env, 2)) == 2
        run = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "configs/pipeline/smoke.yaml",
                                *overrides(root_uri, mlflow_server, head.address), "--only", "dit,superres_1",
                                "--workflow-id", "wf-two-nodes"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        root = Storage.from_uri(root_uri)
        earlier = {step: checkpoints(root, step) for step in STEPS}  # the smoke run's, under other cache keys
        started = time.monotonic()
        while not all(checkpoints(root, step) - earlier[step] for step in STEPS):  # both have one: kill
            assert run.poll() is None, run.stdout.read()[-4000:]
            assert time.monotonic() < started + 400, "no checkpoint of both steps in time"
            time.sleep(0.5)
        time.sleep(2)  # Ray Train registers a reported checkpoint at its next poll (trainer.HEALTH_CHECK_INTERVAL, 0.5 s)
        killed_at = time.monotonic() - started
        worker.kill()
        output, _ = run.communicate(timeout=600)
    finally:
        if worker is not None:
            worker.kill()
        head.stop()
    assert run.returncode == 0, output[-5000:]

    smoke = json.loads(root.read_text("workflows/wf-one/summary.json"))
    shard_uri = next(r["manifest_uri"] for r in smoke["steps"] if r["name"] == "shard")
    num_train = int(read_manifest_at(shard_uri).metrics["num_train"])
    summary = json.loads(root.read_text("workflows/wf-two-nodes/summary.json"))
    records = {r["name"]: r for r in summary["steps"]}
    for step in STEPS:
        assert records[step]["status"] == "ran", output[-3000:]
        step_dir = Storage.from_uri(records[step]["manifest_uri"].rsplit("/", 1)[0])
        manifest = read_manifest_at(step_dir.uri("manifest.json"))  # the final manifest, in S3
        assert manifest.output_uri.startswith(root_uri) and not manifest.verify()
        assert manifest.info["checkpoint_uri"].startswith(f"{root_uri}/steps/{step}/")
        assert manifest.metrics["steps"] == MAX_STEPS[step]
        resumed = manifest.metrics["resumed_from_step"]
        timing = f"{step}: killed at {killed_at:.0f} s, steps took {[(r['name'], r['duration_s']) for r in summary['steps']]}"
        assert resumed > 0 and resumed % CHECKPOINT_EVERY[step] == 0, (resumed, timing)  # from a checkpoint
        keys, nodes = audit(step_dir)
        assert len(nodes) == 2, (step, nodes)  # the workers sat on both nodes
        for epoch, consumed in keys.items():  # each sample at most once per epoch, all workers together
            assert len(consumed) == len(set(consumed)), (step, epoch)
        micro = MICRO_BATCH[step]
        whole_epoch = 2 * micro * ((num_train // 2) // micro)  # 2 workers' equal spans, full micro-batches
        finished = [consumed for epoch, consumed in keys.items() if epoch < max(keys)]
        assert finished and all(len(consumed) == whole_epoch for consumed in finished), step
