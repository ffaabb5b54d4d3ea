"""The resume contract, one base test that every learned stage's test subclasses (the
``StageContract`` style, tests/stage_contract.py): a step interrupted by a crash inside its training
loop, run again on the same storage, resumes from its last checkpoint and ends with exactly the
weights of an uninterrupted run.

The step runs for real (its config, inputs, task from ``TASK_CLASSES``, data stream, checkpoints,
export and outputs) with one substitution: its ``fit`` trains in this process (``local_fit``: the
shared ``train_loop`` under a one-rank ``LocalSession`` whose checkpoints live where Ray Train's
would, ``<output>/_checkpoints/<fit name>/checkpoint_*``) instead of on a Ray Train worker group.
Every fit of a worker group costs ~20 s of start-up here, and each case needs three (interrupted,
resumed, uninterrupted); what resuming restores lives in the train loop and the task, which this
runs unchanged. Ray Train's own resume (a rerun with the same storage_path and name, 2 workers) is
tested with real worker groups by tests/test_trainer.py, test_dit.py, test_distill.py and
test_multinode.py.

A subclass names the DAG's ``step`` (``pipelines/dag.py``; a fan-out by its declared name), the
stage's ``stage`` module (its ``run`` and ``TASK_CLASSES``), the ``task_key`` whose task crashes and
``crash_at_step`` (and ``crash_in_round`` for a stage with rounds), and builds its tiny ``config`` and
its ``inputs`` from ``upstream``: the tiny upstream manifests that the subclasses' module provides as
its ``resume_upstream`` fixture (built once, shared by every stage).

What "resumed" means is read from the checkpoints themselves, which is what every stage writes the
same way: each ``fit`` (a stage may run several, one per progressive round) keeps its last
``train_state.json`` under ``_checkpoints/<fit name>/``, and its ``resumed_from_step`` says where the
attempt that finished started. The interrupted fit's is a checkpoint step after 0 and at most the
crash step (the last one, or the one before it if Ray Train had not registered the last when the
worker failed, as tests/test_dit.py found); every other fit's, and every fit of the uninterrupted
run, is 0. The final weights must be bit-identical: with the data position, optimizer state, EMA
and RNG streams in the checkpoint, the same worker count on the same machine replays the same
arithmetic (tests/test_trainer.py shows it for the trainer itself; this shows it per stage).
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from components.common.config import StepResources
from components.common.step import CHECKPOINT_DIR, Manifest, StepContext, StepOutput
from components.common.storage import Storage
from components.common.tracking import StepTracker
from crash_hooks import crashing

# Ray Train names a fit's checkpoints checkpoint_<timestamp>: in the order they were written, sorted.
CHECKPOINT_STATE = re.compile(rf"{CHECKPOINT_DIR}/(?P<fit>.+)/(?P<checkpoint>checkpoint_[^/]+)/train_state\.json")


@dataclass(frozen=True)
class Upstream:
    """The tiny upstream outputs the stages train on, as manifests: 120 MNIST digits at 8 px in 2
    shards, an untrained ae-tiny (f=2: 4x4x4 latents), its latents, and a perturbed v-prediction
    DiT-Micro as the teacher."""

    shard: Manifest
    autoencoder: Manifest
    latents: Manifest
    dit: Manifest


def step_ctx(root: Path, step: str, workers: int) -> StepContext:
    return StepContext(step=step, workflow_id="resume", cache_key="k", root=Storage.from_uri(str(root)),
                       output=Storage.from_uri(str(root / step)),
                       resources=StepResources(num_workers=workers, cpus_per_worker=0.5),
                       tracker=StepTracker("sqlite:///unused", None))


def fit_starts(output: Storage) -> dict[str, tuple[int, int]]:
    """{fit name: (step, resumed_from_step)} of each fit's last checkpoint under ``output``."""
    last: dict[str, tuple[str, str]] = {}
    for rel in output.list(CHECKPOINT_DIR):
        found = CHECKPOINT_STATE.fullmatch(rel)
        if found and found["checkpoint"] >= last.get(found["fit"], ("", ""))[0]:
            last[found["fit"]] = (found["checkpoint"], rel)
    states = {fit: json.loads(output.read_text(rel)) for fit, (_, rel) in last.items()}
    return {fit: (int(state["step"]), int(state["resumed_from_step"])) for fit, state in states.items()}


def weight_differences(resumed: Storage, reference: Storage, names: list[str]) -> list[str]:
    """The ``file: tensor`` names whose values differ between the two outputs (bit for bit)."""
    import torch
    from safetensors.torch import load

    differing = []
    for name in names:
        ours, theirs = load(resumed.read_bytes(name)), load(reference.read_bytes(name))
        assert sorted(ours) == sorted(theirs), f"{name}: tensors {sorted(set(ours) ^ set(theirs))} in one run only"
        differing += [f"{name}: {key}" for key in ours if not torch.equal(ours[key], theirs[key])]
    return differing


def local_fit(task, cfg, ctx: StepContext, name: str = "train"):
    """``components.common.trainer.fit`` in this process: the same loop, checkpoints and export."""
    from components.common.train_loop import LocalSession, train_loop
    from components.common.train_types import FitResult

    session = LocalSession(Path(ctx.output.path(CHECKPOINT_DIR)) / name)
    metrics = train_loop(task, cfg, session, None, name=name)
    final = sorted(session.root.glob("checkpoint_*"))[-1]
    return FitResult(metrics={**metrics, "train_attempts": 1}, export_dir=final / "export", checkpoint_uri=str(final))


@pytest.mark.integration
class ResumeContract:
    step: str  # the DAG's step name (a fan-out by its declared name, e.g. "superres")
    stage: str  # the module with the step's run() and TASK_CLASSES, e.g. "components.dit.train"
    task_key: str  # the TASK_CLASSES entry whose task crashes
    crash_at_step: int
    crash_in_round: int | None = None  # a stage with rounds: the round the crash happens in
    step_name: str | None = None  # the running step's name where it differs from ``step`` (superres_1)
    workers: int = 1  # local_fit trains one rank

    def config(self):
        raise NotImplementedError

    def inputs(self, upstream: Upstream) -> dict[str, Manifest]:
        raise NotImplementedError

    def run_step(self, module: ModuleType, upstream: Upstream, root: Path) -> tuple[StepOutput, StepContext]:
        ctx = step_ctx(root, self.step_name or self.step, self.workers)
        return module.run(self.config(), self.inputs(upstream), ctx), ctx

    def test_a_crash_in_training_resumes_to_the_weights_of_an_uninterrupted_run(
            self, ray_cluster, resume_upstream, tmp_path, monkeypatch):
        import components.common.trainer

        module = importlib.import_module(self.stage)
        monkeypatch.setattr(components.common.trainer, "fit", local_fit)
        if hasattr(module, "fit"):  # imported at module level
            monkeypatch.setattr(module, "fit", local_fit)
        task_class = module.TASK_CLASSES[self.task_key]
        monkeypatch.setitem(module.TASK_CLASSES, self.task_key,
                            crashing(task_class, self.crash_at_step, self.crash_in_round))
        with pytest.raises(RuntimeError, match=f"injected failure at step {self.crash_at_step}"):
            self.run_step(module, resume_upstream, tmp_path / "interrupted")
        monkeypatch.setitem(module.TASK_CLASSES, self.task_key, task_class)
        resumed, ctx = self.run_step(module, resume_upstream, tmp_path / "interrupted")  # same storage: resumes
        reference, reference_ctx = self.run_step(module, resume_upstream, tmp_path / "uninterrupted")

        train = self.config().train
        starts = fit_starts(ctx.output)
        assert starts and set(starts) == set(fit_starts(reference_ctx.output)), starts
        interrupted = {fit: start for fit, (_, start) in starts.items() if start}
        assert len(interrupted) == 1, f"one fit resumed, not {interrupted} (all: {starts})"
        [(fit, start)] = interrupted.items()
        assert start % train.checkpoint_every == 0 and 0 < start <= self.crash_at_step, (fit, start)
        assert all(step == train.max_steps for step, _ in starts.values()), starts
        assert all(start == 0 for _, start in fit_starts(reference_ctx.output).values())
        if "resumed_from_step" in resumed.metrics:  # the stage's own account of it agrees
            assert resumed.metrics["resumed_from_step"] == start, resumed.metrics

        weights = sorted(name for name in resumed.files if name.endswith(".safetensors"))
        assert weights and weights == sorted(n for n in reference.files if n.endswith(".safetensors"))
        assert weight_differences(ctx.output, reference_ctx.output, weights) == []
