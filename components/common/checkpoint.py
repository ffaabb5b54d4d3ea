"""What a training checkpoint holds, and how a DeepSpeed engine goes into and out of one.

A checkpoint is one directory (Ray Train merges the files every rank reports into it):

    deepspeed/            engine.save_checkpoint: module, optimizer (one file per ZeRO rank),
    latest                lr scheduler, loss scaler, as pickled .pt files
    zero_to_*.py          DeepSpeed's scripts that turn deepspeed/ into plain weights (rank 0)
    ema.safetensors       the EMA weights (rank 0)
    train_state.json      step, data position, counters (rank 0)
    task_state.safetensors  the task's own tensors, when it keeps any (``TrainTask.extra_state``;
                          rank 0: they must be the same on every rank, like a target network)
    export/               only in the final checkpoint: what TrainTask.export wrote
    checkpoint_manifest.rank-<r>.json   one per rank, written last by that rank: the sha256 and size
                          of every file rank r wrote, and the number of ranks

Why the manifest: DeepSpeed unpickles its .pt files (``torch.load(weights_only=False)``), and the
checkpoint lives in storage that others can write to. ``restore`` checks the directory against the
manifest before anything in it is read: every rank's part present, every listed file there with its
size and sha256, no file that no part lists. Each rank lists only its own files because each writes
into its own local directory; they meet only when Ray Train merges them. A checkpoint without a
manifest (older code) is refused: delete the step's _checkpoints to start over.

The manifest catches files changed, added, lost or damaged after the save; it is no signature: whoever
can rewrite a .pt file can rewrite the manifest beside it too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from components.common.ema import EMA
from components.common.storage import sha256_file

DEEPSPEED_TAG = "deepspeed"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"
TASK_STATE_FILE = "task_state.safetensors"
EXPORT_DIR = "export"
MANIFEST_PART = "checkpoint_manifest.rank-{rank}.json"
MANIFEST_PARTS = "checkpoint_manifest.rank-*.json"
START_OVER = "delete the step's _checkpoints to start over (training restarts from step 0)"


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


def save(engine, ema: EMA | None, state: TrainState, directory: Path, rank: int, task=None,
         export: Callable[[Path], None] | None = None) -> None:
    """Collective: every rank writes its part of the DeepSpeed state into its own ``directory``,
    then ``export(directory / EXPORT_DIR)`` when given (collective too), then its manifest part."""
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    if rank == 0:
        if ema is not None:
            ema.save(directory / EMA_FILE)
        extra = task.extra_state() if callable(getattr(task, "extra_state", None)) else None
        if extra:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(directory / TASK_STATE_FILE))
        (directory / STATE_FILE).write_text(state.to_json())
    if export is not None:
        export(directory / EXPORT_DIR)
    write_manifest_part(directory, rank, state.world_size)


def restore(engine, ema: EMA | None, directory: Path, world_size: int, task=None) -> TrainState:
    """Load a checkpoint written by ``save`` (all ranks' files merged) into ``engine`` and ``ema``,
    once ``verify`` found its files to be the ones the ranks wrote."""
    if not (directory / STATE_FILE).is_file():
        raise CheckpointError(f"{directory}: not a training checkpoint (no {STATE_FILE})")
    verify(directory)  # before anything is deserialised: DeepSpeed's .pt files are pickles
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


# ---------------------------------------------------------------- the manifest


def write_manifest_part(directory: Path, rank: int, world_size: int) -> None:
    """Last of this rank's files: the sha256 and size of each file in its ``directory`` (all its own:
    Ray Train merges the ranks' directories only after every rank has reported)."""
    files = {rel: {"sha256": sha256_file(path), "size": path.stat().st_size} for rel, path in _files(directory)}
    part = {"rank": rank, "world_size": world_size, "files": files}
    (directory / MANIFEST_PART.format(rank=rank)).write_text(json.dumps(part, indent=2, sort_keys=True))


def verify(directory: Path) -> None:
    """Refuse, naming each file at fault, a checkpoint whose files are not exactly those its ranks
    listed: a part missing, a listed file missing or of another size or sha256, a file no part lists
    (DeepSpeed globs for ZeRO partitions and restore loads task_state.safetensors if it is there, so an
    added file is as dangerous as a changed one). Reads nothing but JSON and bytes to hash."""
    listed: dict[str, tuple[int, dict]] = {}  # path -> (rank, record); ranks write distinct files
    problems = []
    for rank, part in _manifest_parts(directory).items():
        for rel, record in part["files"].items():
            if rel in listed and listed[rel][1] != record:  # two ranks wrote the same name: one lost the merge
                problems.append(f"{rel}: ranks {listed[rel][0]} and {rank} list different contents")
            listed[rel] = (rank, record)
    for rel, (rank, record) in sorted(listed.items()):
        problem = _file_problem(directory / rel, record)
        if problem:
            problems.append(f"{rel}: {problem} (written by rank {rank})")
    problems += [f"{rel}: unlisted: no rank's manifest part names it" for rel, _ in _files(directory)
                 if rel not in listed]
    if problems:
        raise CheckpointError(
            f"{directory}: the checkpoint differs from its manifest, so none of it is loaded: "
            + "; ".join(problems) + f". Files changed after the save (edited, added, lost, or damaged in "
            f"storage); {START_OVER}.")


def _manifest_parts(directory: Path) -> dict[int, dict]:
    """rank -> its manifest part, all ``world_size`` of them, or a CheckpointError naming the gap."""
    found = sorted(directory.glob(MANIFEST_PARTS))
    if not found:
        raise CheckpointError(
            f"{directory}: no checkpoint manifest ({MANIFEST_PARTS}): written by older code, which recorded no "
            f"sha256 of the DeepSpeed pickles that resuming would unpickle, so it is not loaded; {START_OVER}.")
    parts = dict(_read_part(directory, path) for path in found)
    worlds = sorted({part["world_size"] for part in parts.values()})
    if len(worlds) != 1:
        raise CheckpointError(f"{directory}: the manifest parts disagree on the number of workers ({worlds}); "
                              f"{START_OVER}.")
    wrong = [MANIFEST_PART.format(rank=r) + (": missing" if r not in parts else ": unlisted")
             for r in sorted(set(range(worlds[0])) ^ set(parts))]
    if wrong:
        raise CheckpointError(f"{directory}: saved by {worlds[0]} workers, each listing its own files in its "
                              f"own manifest part: {'; '.join(wrong)}; {START_OVER}.")
    return parts


def _read_part(directory: Path, path: Path) -> tuple[int, dict]:
    try:
        part = json.loads(path.read_text())
        rank, world, files = int(part["rank"]), int(part["world_size"]), part["files"]
    except (ValueError, KeyError, TypeError):
        rank, files = None, None
    if not isinstance(files, dict) or path.name != MANIFEST_PART.format(rank=rank):
        raise CheckpointError(f"{directory}: {path.name}: not a manifest part that save wrote; {START_OVER}.")
    return rank, {"world_size": world, "files": files}


def _file_problem(path: Path, record) -> str | None:
    record = record if isinstance(record, dict) else {}  # a garbled record matches no file
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"size {size} bytes, the manifest says {record.get('size')}"
    if sha256_file(path) != record.get("sha256"):
        return "sha256 differs from the manifest's"
    return None


def _files(directory: Path) -> list[tuple[str, Path]]:
    """(path relative to ``directory``, path) of every file in it but the manifest parts."""
    return [(path.relative_to(directory).as_posix(), path) for path in sorted(directory.rglob("*"))
            if path.is_file() and not (path.parent == directory and path.match(MANIFEST_PARTS))]
