"""The one trainer of every learned stage: Ray Train workers, each driving a DeepSpeed engine.

A stage describes *what* to train with a ``TrainTask`` (model, loss, export) and a ``TrainConfig``
(its ``train:`` section; both in ``components.common.train_types``), then calls ``fit``. The trainer owns *how*: ZeRO stage, precision,
clipping, accumulation, EMA, checkpoints, resume, non-finite losses, logging.

- Resume: re-running a step uses the same Ray Train ``RunConfig(storage_path=ctx.checkpoint_uri,
  name=...)``, so ``ray.train.get_checkpoint()`` returns the latest checkpoint and the run ends at
  the same ``max_steps``. Within one ``fit``, a worker group that lost a worker (its process or
  node died, was OOM-killed or preempted: ``system_failure``) is started again from the latest
  checkpoint, up to ``resources.max_retries`` times; any other error is deterministic and fails at
  once (Ray Train's own ``FailureConfig`` would retry both). Resuming needs the same ``num_workers``, and a
  checkpoint that matches its manifest (``components.common.checkpoint``: each rank records the
  sha256 and size of the files it saved): any file changed, lost or added since the save, or a
  checkpoint from before manifests, is refused with a ``CheckpointError`` naming the file, before
  anything is deserialised (DeepSpeed's files are pickles).
- Data: ``train.batch_size`` is the global batch; each of W workers takes micro-batches of
  batch_size / (W x grad_accum) from its ``BatchSource`` (``components.common.stream``), and the
  checkpoint keeps each worker's data position (epoch, position in its epoch order, batches of the
  epoch consumed), so a resumed run reads on from there without re-reading what it consumed.
- Steps count optimizer updates. A micro-batch whose loss is not finite on any rank (ranks agree
  by an all-reduce before backward) is skipped: no backward, no update, the batch is consumed and
  counted, the step and the LR schedule do not advance. ``max_nonfinite_in_row`` of them in a row
  fail the step with ``NonFiniteLossError``.
- Floating-point tensors of a batch are moved to the engine's device and cast to the compute
  dtype (bf16/fp16 when enabled): the model's weights have that dtype under DeepSpeed.
- Exported weights: rank 0 calls ``task.export(model, ema_model, out_dir)`` at the end (fp32 CPU
  copies); the files travel inside the final checkpoint and ``fit`` returns them in a local
  directory (``FitResult.export_dir``). The stage uploads them: ``result.upload_to(ctx.output)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from components.common import checkpoint
from components.common.train_types import DATA_AUDIT_DIR, FitResult, TrainConfig, TrainingError, TrainTask

if TYPE_CHECKING:
    from components.common.step import StepContext

log = logging.getLogger(__name__)

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and
# notices a started worker group, a reported checkpoint or a finished fit only at a poll: each fit paid
# about 2.5 s of such waits (a one-off probe, a trivial 2-worker fit here: 15.1 s -> 12.6 s at 0.5 s). A poll
# is one status call per worker, cheap at any realistic worker count; a value set by the user wins.
HEALTH_CHECK_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# ---------------------------------------------------------------- driver side


def fit(task: TrainTask, cfg: TrainConfig, ctx: "StepContext", name: str = "train") -> FitResult:
    """Train ``task`` on ``ctx.resources.num_workers`` Ray Train workers; see the module docstring."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

    from components.common.parallel import check_pool_fits_cluster
    from components.common.s3_access import arrow_filesystem
    from components.common.train_loop import ray_worker

    os.environ.setdefault(*HEALTH_CHECK_INTERVAL)  # read by the controller this process starts
    res = ctx.resources
    use_gpu = res.gpus_per_worker > 0
    if cfg.precision == "fp16" and not use_gpu:
        raise ValueError("train.precision fp16 needs GPUs (DeepSpeed: 'fp16 is not supported' on CPU); "
                         "use bf16 or fp32")
    if not callable(getattr(task, "batch_source", None)) and not callable(getattr(task, "batches", None)):
        raise ValueError("fit needs a task with a batch_source() or batches() method")
    cfg.micro_batch_size(res.num_workers)  # refuses an indivisible global batch before any worker starts
    # the data needs no CPUs of its own: each worker reads and decodes its shards on threads inside
    # its own cpus_per_worker, so the budget is the workers'
    check_pool_fits_cluster(ctx.step, res)
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    filesystem, storage_path = arrow_filesystem(ctx.checkpoint_uri)
    loop_config = {"task": task, "train": cfg.model_dump(), "tracker": ctx.tracker, "name": name,
                   "audit_uri": ctx.output.uri(DATA_AUDIT_DIR) if cfg.audit_data else None}
    def new_trainer():
        # max_failures=0: Ray Train would retry every worker error, a ValueError as readily as a dead
        # node; the loop below retries only the failures a retry can cure (see system_failure)
        return TorchTrainer(
            ray_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                         placement_strategy=res.placement_strategy),
            run_config=RunConfig(storage_path=storage_path, storage_filesystem=filesystem, name=name,
                                 failure_config=FailureConfig(max_failures=0),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        )

    retries = retries_left(ctx)
    for attempt in range(1, retries + 2):
        try:
            result = new_trainer().fit()  # the same storage path and name: resumes from the latest checkpoint
            break
        except TrainingFailedError as e:
            failures = getattr(e, "worker_failures", None) if isinstance(e, WorkerGroupError) else None
            first = next(iter(failures.values())) if failures else e
            if not system_failure(e) or attempt > retries:
                raise TrainingError(f"step {ctx.step!r}: training failed (attempt {attempt}): {first}") from e
            log.warning("step %s: a training worker was lost (%s: %s); restarting from the latest checkpoint "
                        "(attempt %d of %d)", ctx.step, type(first).__name__, str(first)[:300], attempt + 1,
                        retries + 1)
    final = result.checkpoint
    uri = f"s3://{final.path}" if ctx.checkpoint_uri.startswith("s3://") else final.path
    metrics = {**dict(result.metrics or {}), "train_attempts": attempt}
    return FitResult(metrics=metrics, export_dir=_fetch_export(result, ctx), checkpoint_uri=uri)


def retries_left(ctx: "StepContext") -> int:
    """One budget for both layers of retry: ``resources.max_retries`` less the times the step's own
    task was already restarted (its node died: ``pipelines.step_task`` leaves a marker per attempt),
    so a step never makes more than max_retries + 1 attempts in all."""
    from components.common.storage import StorageError

    try:
        task_attempts = len(ctx.output.list(f"_attempts/{ctx.workflow_id}"))
    except StorageError:
        task_attempts = 1
    return max(0, ctx.resources.max_retries - max(0, task_attempts - 1))


SYSTEM_FAILURES = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
                   "OutOfMemoryError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError",
                   "WorkerGroupStartupTimeoutError", "WorkerHealthCheckTimeoutError", "WorkerHealthCheckFailedError")


# What a surviving rank's collective raises when its peer's process or node died: gloo's TCP pair and
# NCCL's errors for a vanished peer. Ray Train may poll that rank's error before it has seen the dead
# one (at a 0.5 s poll it did, in tests/test_multinode.py), so such an error alone also means a lost
# worker; beside a deterministic error of another rank it is only that rank's echo.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
             "remote process exited", "NCCL communicator was aborted")


def system_failure(error: BaseException) -> bool:
    """Whether a failed fit lost a worker (its process or node died, was OOM-killed or preempted):
    worth a restart from the checkpoint. A deterministic error raised by the training code (a
    ValueError, a ConfigError, NonFiniteLossError, a checkpoint refused) would fail the same way
    again, so it fails the step at once. Every worker failure being a collective that lost its peer
    (``PEER_LOST``) counts as a lost worker too."""
    failures = list((getattr(error, "worker_failures", None) or {}).values())
    if any(_in_chain(e, _is_system_class) for e in (error, *failures)):
        return True
    return bool(failures) and all(_in_chain(f, _lost_its_peer) for f in failures)


def _is_system_class(error: BaseException) -> bool:
    return any(cls.__name__ in SYSTEM_FAILURES for cls in type(error).__mro__)


def _lost_its_peer(error: BaseException) -> bool:
    return any(marker in str(error) for marker in PEER_LOST)


def _in_chain(error: BaseException, test) -> bool:
    """``test`` holds for ``error`` or one of its causes (``__cause__``, or Ray's ``cause``)."""
    pending, visited = [error], set()
    while pending:
        current = pending.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
        if test(current):
            return True
        pending += [c for c in (current.__cause__, getattr(current, "cause", None)) if isinstance(c, BaseException)]
    return False


def _fetch_export(result, ctx: "StepContext") -> Path:
    """Copy only export/ out of the final checkpoint (not the optimizer state)."""
    import pyarrow.fs

    local = ctx.scratch_dir() / checkpoint.EXPORT_DIR
    local.mkdir()
    source = f"{result.checkpoint.path.rstrip('/')}/{checkpoint.EXPORT_DIR}"
    pyarrow.fs.copy_files(source, str(local), source_filesystem=result.checkpoint.filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local
