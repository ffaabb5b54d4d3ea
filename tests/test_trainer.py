"""The shared trainer (components/common/trainer.py): DeepSpeed in Ray Train workers on CPU.

Each TorchTrainer.fit costs ~25 s here, so the Ray tests each check several things at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components.common.engine import deepspeed_config, lr_factor
from components.common.storage import Storage
from components.common.train_types import TrainConfig, TrainingError, TrainTask
from components.common.trainer import fit
from trainer_tasks import (Regression, RegressionStream, ShardClassifier, ema_updates, history, logged, make_ctx,
                           sqlite_tracker)

# ---------------------------------------------------------------- no Ray


def test_config_schedule_and_protocol():
    cfg = TrainConfig(batch_size=24, grad_accum=3, zero_stage=2, precision="bf16", grad_clip=0.5,
                      deepspeed={"zero_optimization": {"overlap_comm": True}})
    ds = deepspeed_config(cfg, world_size=2)  # the global batch of 24: micro-batches of 4 on 2 workers
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_clipping"] == 0.5
    with pytest.raises(ValueError, match="train.batch_size 24 .* not divisible by 5 workers x grad_accum 3"):
        cfg.micro_batch_size(5)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["bf16"]["enabled"]
    cosine = TrainConfig(lr_schedule="cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(cosine, 0) == pytest.approx(0.1) and lr_factor(cosine, 9) == 1.0
    assert lr_factor(cosine, 60) == pytest.approx(0.55) and lr_factor(cosine, 110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="zero_stage"):
        TrainConfig(zero_stage=4)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    assert isinstance(Regression(), TrainTask)


def test_local_loop_bf16_zero3_accumulation_and_resume(tmp_path):
    """One process (LocalSession): ZeRO-3 + bf16 + accumulation, a crash at step 5, a resume."""
    from components.common.train_loop import LocalSession, train_loop

    cfg = TrainConfig(max_steps=6, batch_size=16, grad_accum=2, lr=1e-2, zero_stage=3, precision="bf16",
                      checkpoint_every=2, log_every=1, ema_decay=0.5, warmup_steps=2)
    with pytest.raises(RuntimeError, match="injected crash at step 5"):
        train_loop(Regression(batch_size=8, fail_at_step=5), cfg, LocalSession(tmp_path / "ckpt"), None)
    assert [p.name for p in sorted((tmp_path / "ckpt").iterdir())] == ["checkpoint_000000", "checkpoint_000001"]

    session = LocalSession(tmp_path / "ckpt")
    final = train_loop(Regression(batch_size=8, log_dir=tmp_path), cfg, session, None)
    steps = [r["step"] for r in logged(tmp_path)]
    assert steps[0] == 4 and steps[-1] == 5 and len(steps) == 4  # resumed at 4, 2 micro-batches a step
    assert final["step"] == 6 and final["samples_seen"] == 6 * 2 * 8
    last = sorted((tmp_path / "ckpt").iterdir())[2]
    state = json.loads((last / "train_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (6, 0, 12)
    assert ema_updates(last / "ema.safetensors") == 6  # 4 restored + 2 new
    assert {"loss", "lr", "grad_norm", "images_per_s", "abs_err"} <= set(final)
    assert np.isfinite(final["grad_norm"]) and final["lr"] == pytest.approx(1e-2)

    again = train_loop(Regression(batch_size=8, log_dir=tmp_path), cfg, LocalSession(tmp_path / "ckpt"), None)
    assert len(logged(tmp_path)) == 4 and again["step"] == 6 and again["loss"] == final["loss"]  # no new steps

    # Another worker count cannot pick up these data positions and optimizer partitions: refused, named.
    from components.common.checkpoint import CheckpointError, restore

    with pytest.raises(CheckpointError, match="saved by 1 workers, resuming with 2.*resources.num_workers: 1"):
        restore(None, None, last, world_size=2)

    # The interrupted-and-resumed run ends with exactly the weights of an uninterrupted one.
    reference = LocalSession(tmp_path / "reference")
    train_loop(Regression(batch_size=8), cfg, reference, None)
    ref_export = sorted((tmp_path / "reference").iterdir())[-1] / "export"
    for name in ("model.safetensors", "ema.safetensors"):
        resumed, uninterrupted = load_file(last / "export" / name), load_file(ref_export / name)
        for key in uninterrupted:
            torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=f"{name} {key}")


MODEL_PT = "deepspeed/mp_rank_00_model_states.pt"
OPTIM_PT = "deepspeed/zero_pp_rank_{}_mp_rank_00_optim_states.pt"
PART = "checkpoint_manifest.rank-{}.json"


def checkpoint_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def tampered_copy(saved: Path, root: Path, tamper) -> Path:
    """A copy of checkpoint ``saved`` as the only checkpoint under ``root``, changed by ``tamper``."""
    import shutil

    shutil.copytree(saved, root / saved.name)
    tamper(root / saved.name)
    return root / saved.name


def grow(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def claim_two_ranks(directory: Path) -> None:
    part = json.loads((directory / PART.format(0)).read_text())
    (directory / PART.format(0)).write_text(json.dumps({**part, "world_size": 2}))


TAMPERINGS = {  # what is done to a saved checkpoint -> what the refusal must say
    "a byte changed": (lambda d: flip_a_byte(d / MODEL_PT), f"{MODEL_PT}: sha256 differs from the manifest's"),
    "a file lost": (lambda d: (d / OPTIM_PT.format(0)).unlink(), f"{OPTIM_PT.format(0)}: missing"),
    "a .pt added": (lambda d: (d / OPTIM_PT.format(1)).write_bytes((d / OPTIM_PT.format(0)).read_bytes()),
                    f"{OPTIM_PT.format(1)}: unlisted"),
    "a file grown": (lambda d: grow(d / "ema.safetensors"), "ema.safetensors: size .* the manifest says"),
    "a rank's part lost": (claim_two_ranks, f"saved by 2 workers.*{PART.format(1)}: missing"),
    "no manifest": (lambda d: (d / PART.format(0)).unlink(),
                    "no checkpoint manifest.*older code.*delete the step's _checkpoints to start over"),
}


def test_resume_verifies_the_checkpoint_against_its_manifest_before_unpickling(tmp_path, monkeypatch):
    """One process (LocalSession): the manifest part lists every file with its sha256 and size; a
    checkpoint changed after the save is refused, naming the file, before DeepSpeed unpickles anything."""
    import re

    import deepspeed

    from components.common.checkpoint import CheckpointError
    from components.common.ema import EMA
    from components.common.storage import sha256_file
    from components.common.train_loop import LocalSession, train_loop

    cfg = TrainConfig(max_steps=2, batch_size=16, lr=1e-2, zero_stage=2, checkpoint_every=1, log_every=1)
    train_loop(Regression(), cfg, LocalSession(tmp_path / "saved"), None)
    saved = sorted((tmp_path / "saved").iterdir())[-1]  # the final checkpoint: export/ included
    part = json.loads((saved / PART.format(0)).read_text())
    assert (part["rank"], part["world_size"]) == (0, 1)
    assert set(part["files"]) == checkpoint_files(saved) - {PART.format(0)}
    assert {MODEL_PT, OPTIM_PT.format(0), "ema.safetensors", "export/model.safetensors"} <= set(part["files"])
    model_pt = saved / MODEL_PT
    assert part["files"][MODEL_PT] == {"sha256": sha256_file(model_pt), "size": model_pt.stat().st_size}

    unpickled, loads = [], []  # every torch.load, and every load of the engine or the EMA
    real_torch_load, real_engine_load, real_ema_load = torch.load, deepspeed.DeepSpeedEngine.load_checkpoint, EMA.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: unpickled.append(str(f)) or real_torch_load(f, *a, **k))
    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "load_checkpoint",
                        lambda self, *a, **k: loads.append("engine") or real_engine_load(self, *a, **k))
    monkeypatch.setattr(EMA, "load", lambda self, path: loads.append("ema") or real_ema_load(self, path))

    for name, (tamper, refusal) in TAMPERINGS.items():
        copy = tampered_copy(saved, tmp_path / re.sub(r"\W", "_", name), tamper)
        with pytest.raises(CheckpointError, match=refusal) as refused:
            train_loop(Regression(), cfg, LocalSession(copy.parent), None)
        assert str(copy) in str(refused.value), name
        assert unpickled == [] and loads == [], (name, unpickled, loads)

    # the spies do see a resume: the untouched copy is verified, then unpickled and loaded
    copy = tampered_copy(saved, tmp_path / "untouched", lambda d: None)
    assert train_loop(Regression(), cfg, LocalSession(copy.parent), None)["step"] == 2
    assert str(copy / MODEL_PT) in unpickled and loads == ["engine", "ema"], (unpickled, loads)



class WorkerGroupFailure(Exception):
    """Stands in for Ray Train's WorkerGroupError: the workers' errors by rank."""

    def __init__(self, failures: dict[int, BaseException]):
        super().__init__("training failed")
        self.worker_failures = failures


class ActorDiedError(Exception):
    """Named like Ray's: system_failure goes by the class name."""


GLOO_PEER_CLOSED = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:40657. "
                                "This is typically caused by a remote worker crashing.")


def test_a_rank_that_lost_its_peer_is_a_system_failure_unless_another_rank_raised():
    from components.common.trainer import system_failure

    # the dead rank not polled yet: only the survivor's collective error (tests/test_multinode.py saw it)
    assert system_failure(WorkerGroupFailure({0: GLOO_PEER_CLOSED}))
    assert system_failure(WorkerGroupFailure({0: GLOO_PEER_CLOSED, 1: ActorDiedError("node died")}))
    wrapped = RuntimeError("worker 1 failed")
    wrapped.__cause__ = ActorDiedError("the actor died")
    assert system_failure(WorkerGroupFailure({1: wrapped}))
    # a deterministic error stays deterministic, whatever its peer echoes
    assert not system_failure(WorkerGroupFailure({1: ValueError("bad config")}))
    assert not system_failure(WorkerGroupFailure({0: GLOO_PEER_CLOSED, 1: ValueError("bad config")}))
    assert not system_failure(WorkerGroupFailure({}))
    assert not system_failure(ValueError("Connection closed by peer"))  # no worker failures: not a lost worker


# ---------------------------------------------------------------- Ray Train, 2 workers


def test_fit_zero1_stream_logs_to_mlflow_and_skips_a_nonfinite_loss(ray_cluster, tmp_path):
    tracker = sqlite_tracker(tmp_path)
    ctx = make_ctx(tmp_path, tracker)
    cfg = TrainConfig(max_steps=12, batch_size=32, lr=2e-2, zero_stage=1, checkpoint_every=100,
                      log_every=1, ema_decay=0.9)  # global batch 32: 16 per worker
    # Only rank 1 sees a NaN at step 3: both ranks must agree to skip that micro-batch.
    task = RegressionStream(nan_at_step=3, nan_rank=1, log_dir=tmp_path)
    result = fit(task, cfg, ctx)

    assert result.metrics["step"] == 12 and result.metrics["nonfinite_skipped"] == 1
    assert result.metrics["samples_seen"] == 12 * 16 * 2  # the skipped batch is not counted
    losses = history(tracker, "loss")
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
    for key in ("lr", "grad_norm", "images_per_s", "abs_err", "nonfinite_skipped"):
        values = history(tracker, key)
        assert len(values) == 12 and all(np.isfinite(values)), key
    assert history(tracker, "nonfinite_skipped")[-1] == 1
    # rank 0 computed 13 losses (the skipped one included) and 8 batches an epoch of 128 rows each
    assert len(logged(tmp_path, 0)) == len(logged(tmp_path, 1)) == 13
    files = result.upload_to(ctx.output, "weights")
    assert files == ["weights/ema.safetensors", "weights/model.safetensors"]
    assert ctx.output.exists("weights/model.safetensors")


def test_fit_zero2_nonfinite_streak_fails_then_rerun_resumes(ray_cluster, tmp_path):
    tracker = sqlite_tracker(tmp_path)
    ctx = make_ctx(tmp_path, tracker, retries=2)  # retries are for lost workers: this error is not retried
    cfg = TrainConfig(max_steps=8, batch_size=32, lr=2e-2, zero_stage=2, checkpoint_every=2,
                      log_every=1, ema_decay=0.9, max_nonfinite_in_row=3)
    with pytest.raises(TrainingError, match=r"\(attempt 1\): 3 non-finite losses in a row at step 5"):
        fit(Regression(nan_at_step=5, nan_times=99), cfg, ctx)
    checkpoints = sorted(p for p in (tmp_path / "out" / "_checkpoints" / "train").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # steps 2 and 4 (keep_checkpoints=2)
    saved = json.loads((checkpoints[-1] / "train_state.json").read_text())
    assert saved["step"] == 4 and saved["batches_in_epoch"] == 4
    assert sorted(p.name for p in checkpoints[-1].iterdir()) == \
        ["checkpoint_manifest.rank-0.json", "checkpoint_manifest.rank-1.json",
         "deepspeed", "ema.safetensors", "latest", "train_state.json", "zero_to_fp32.py", "zero_to_torch.py"]
    assert {p.name for p in (checkpoints[-1] / "deepspeed").iterdir()} >= \
        {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    check_two_rank_manifest(checkpoints[-1], tmp_path / "copies")

    result = fit(Regression(log_dir=tmp_path), cfg, ctx)  # same storage and name: resume
    steps = [r["step"] for r in logged(tmp_path)]
    assert steps == [4, 5, 6, 7], steps
    assert result.metrics["step"] == 8 and result.metrics["samples_seen"] == 8 * 16 * 2
    assert ema_updates(Path(result.checkpoint_uri) / "ema.safetensors") == 8  # 4 restored + 4 new
    losses = history(tracker, "loss")
    assert losses[-1] < 0.5 * losses[0], losses
    from components.common.checkpoint import verify

    verify(Path(result.checkpoint_uri))  # the final checkpoint, export/ included, has both parts too


def check_two_rank_manifest(merged: Path, scratch: Path) -> None:
    """Each of the 2 ranks listed the files it wrote into its own directory, and Ray Train's merge of
    the directories holds both lists: together exactly its files. A gap in either is refused."""
    from components.common.checkpoint import CheckpointError, verify

    parts = [json.loads((merged / PART.format(r)).read_text()) for r in (0, 1)]
    assert [(p["rank"], p["world_size"]) for p in parts] == [(0, 2), (1, 2)]
    assert OPTIM_PT.format(1) in parts[1]["files"] and OPTIM_PT.format(1) not in parts[0]["files"]
    assert {OPTIM_PT.format(0), MODEL_PT, "ema.safetensors", "train_state.json"} <= set(parts[0]["files"])
    listed = set(parts[0]["files"]) | set(parts[1]["files"])
    assert listed == checkpoint_files(merged) - {PART.format(0), PART.format(1)}
    verify(merged)
    lost = tampered_copy(merged, scratch / "lost_part", lambda d: (d / PART.format(1)).unlink())
    with pytest.raises(CheckpointError, match=f"saved by 2 workers.*{PART.format(1)}: missing"):
        verify(lost)
    changed = tampered_copy(merged, scratch / "changed", lambda d: flip_a_byte(d / OPTIM_PT.format(1)))
    with pytest.raises(CheckpointError, match=f"{OPTIM_PT.format(1)}: sha256 differs .*written by rank 1"):
        verify(changed)


def audited_keys(output: Storage) -> dict[int, list[str]]:
    """epoch -> the keys the workers consumed in it, from the train.audit_data files."""
    by_epoch: dict[int, list[str]] = {}
    for rel in output.list("_data_audit"):
        for batch in json.loads(output.read_text(rel))["batches"]:
            by_epoch.setdefault(batch["epoch"], []).extend(batch["keys"])
    return by_epoch


def last_loss_per_step(log_dir, rank=0) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in logged(log_dir, rank)}  # a re-run step: its last attempt


def test_a_worker_killed_mid_epoch_resumes_bit_identically_from_s3_shards(ray_cluster, s3_bucket, tmp_path):
    """Two workers stream shards from (moto) S3; rank 1 dies mid-epoch; Ray Train restarts both from
    the last checkpoint, and the run ends with the losses and weights of an uninterrupted run."""
    from test_stream import write_shards

    counts = (40,) * 8  # 320 samples: 160 per worker, 20 micro-batches of 8 an epoch
    rels = write_shards(tmp_path / "shards", counts)
    shards = Storage.from_uri(f"s3://{s3_bucket}/shards")
    for rel in rels:
        shards.upload(rel, tmp_path / "shards" / rel)
    cfg = TrainConfig(max_steps=26, batch_size=16, lr=5e-2, zero_stage=2, checkpoint_every=4, log_every=2,
                      ema_decay=0.9, audit_data=True)  # 26 steps: all of epoch 0, 6 steps into epoch 1

    crashed_ctx = make_ctx(tmp_path, retries=1, root=f"s3://{s3_bucket}/crashed")  # checkpoints in S3 too
    (tmp_path / "crashed").mkdir()
    task = ShardClassifier(shards.uri(), rels, counts, die_at_step=10, marker=str(tmp_path / "died"),
                           log_dir=tmp_path / "crashed")
    result = fit(task, cfg, crashed_ctx)
    (tmp_path / "reference").mkdir()
    reference = fit(ShardClassifier(shards.uri(), rels, counts, log_dir=tmp_path / "reference"), cfg,
                    make_ctx(tmp_path / "reference"))

    assert (tmp_path / "died").exists()
    steps = [r["step"] for r in logged(tmp_path / "crashed")]
    assert steps[steps.index(10) + 1] == 8  # died in step 10, restarted from the checkpoint of step 8
    assert result.metrics["step"] == 26 and result.metrics["resumed_from_step"] == 8
    crashed, uninterrupted = last_loss_per_step(tmp_path / "crashed"), last_loss_per_step(tmp_path / "reference")
    assert list(crashed) == list(range(26)) and crashed == uninterrupted  # the same loss curve, bit for bit
    exported = Storage.from_uri(result.checkpoint_uri)
    for name in ("model.safetensors", "ema.safetensors"):
        from safetensors.torch import load as load_bytes

        resumed = load_bytes(exported.read_bytes(f"export/{name}"))
        plain = load_file(str(Path(reference.checkpoint_uri) / "export" / name))
        for key in plain:
            assert torch.equal(resumed[key], plain[key]), f"{name} {key}"

    assert result.checkpoint_uri.startswith(f"s3://{s3_bucket}/crashed/out/_checkpoints/train/checkpoint_")
    state = json.loads(exported.read_text("train_state.json"))
    assert (state["step"], state["epoch"], state["batches_in_epoch"], state["data_position"]) == (26, 1, 6, 48)
    # Every sample of epoch 0 was consumed exactly once across the two workers, the restart included.
    keys = audited_keys(crashed_ctx.output)
    assert len(keys[0]) == len(set(keys[0])) == 320
    assert len(keys[1]) == len(set(keys[1])) == 6 * 8 * 2
    assert result.upload_to(crashed_ctx.output) == ["ema.safetensors", "model.safetensors"]
