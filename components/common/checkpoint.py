"""What a training checkpoint holds, and how a DeepSpeed engine goes into and out of one.

A checkpoint is one directory (Ray Train merges the files every rank reports into it):

    deepspeed/            engine.save_checkpoint: module, optimizer (one file per ZeRO rank),
    latest                lr scheduler, loss scaler
    ema.safetensors       the EMA weights (rank 0)
    train_state.json      step, data position, counters (rank 0)
    task_state.safetensors  the task's own tensors, when it keeps any (``TrainTask.extra_state``;
                          rank 0: they must be the same on every rank, like a target network)
    export/               only in the final checkpoint: what TrainTask.export wrote
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from components.common.ema import EMA

DEEPSPEED_TAG = "deepspeed"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"
TASK_STATE_FILE = "task_state.safetensors"
EXPORT_DIR = "export"


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # data position: the epoch being read ...
    batches_in_epoch: int = 0  # ... how many of this worker's batches of it were consumed ...
    data_position: int = 0  # ... and where the next one starts in the worker's epoch order (EpochPlan)
    samples_seen: int = 0  # over all workers, finite micro-batches only
    nonfinite_skipped: int = 0  # micro-batches whose loss was not finite on some rank
    bad_samples: int = 0  # this worker's samples skipped as unreadable (on_bad_sample: skip)
    resumed_from_step: int = 0  # the step this attempt started from (0: from scratch)
    world_size: int = 1
    last_metrics: dict[str, float] = field(default_factory=dict)  # rank 0's last logged window

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


@contextmanager
def gathered(engine):
    """Inside: every parameter of ``engine.module`` is whole on every rank (ZeRO-3 gathers, a
    collective all ranks must enter; other stages already hold whole parameters)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's weights as fp32 CPU tensors. Collective under ZeRO-3: call on every rank.
    Under bf16/fp16 these are the working (16-bit) weights widened, not the fp32 master copy."""
    with gathered(engine):
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in engine.module.state_dict().items()}


def save(engine, ema: EMA | None, state: TrainState, directory: Path, rank: int, task=None) -> None:
    """Collective: every rank writes its part of the DeepSpeed state into its own ``directory``."""
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    if rank == 0:
        if ema is not None:
            ema.save(directory / EMA_FILE)
        extra = task.extra_state() if callable(getattr(task, "extra_state", None)) else None
        if extra:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(directory / TASK_STATE_FILE))
        (directory / STATE_FILE).write_text(state.to_json())


def restore(engine, ema: EMA | None, directory: Path, world_size: int, task=None) -> TrainState:
    """Load a checkpoint written by ``save`` (all ranks' files merged) into ``engine`` and ``ema``."""
    if not (directory / STATE_FILE).is_file():
        raise CheckpointError(f"{directory}: not a training checkpoint (no {STATE_FILE})")
    state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
    if state.world_size != world_size:
        raise CheckpointError(
            f"{directory}: saved by {state.world_size} workers, resuming with {world_size}. Each worker's "
            "data position is a place in its own share of the epoch, and ZeRO partitions the optimizer "
            f"state by worker, so neither carries over to {world_size} workers: resume with "
            f"resources.num_workers: {state.world_size}, or delete the step's _checkpoints to start over "
            "(the global batch, train.batch_size, is the same either way)."
        )
    load_path, _ = engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    if load_path is None:
        raise CheckpointError(f"{directory}: DeepSpeed found no checkpoint under tag {DEEPSPEED_TAG!r}")
    if ema is not None:
        ema.load(directory / EMA_FILE)
    if callable(getattr(task, "load_extra_state", None)) and (directory / TASK_STATE_FILE).is_file():
        from safetensors.torch import load_file

        task.load_extra_state(load_file(str(directory / TASK_STATE_FILE)))
    return state
