"""The one trainer of every learned stage: Ray Train workers, each driving a DeepSpeed engine.

A stage describes *what* to train with a ``TrainTask`` (model, loss, export) and a ``TrainConfig``
(its ``train:`` section), then calls ``fit``. The trainer owns *how*: ZeRO stage, precision,
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from components.common import checkpoint
from components.common.config import StrictModel
from components.common.stream import LoaderConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from components.common.step import StepContext
    from components.common.storage import Storage


class TrainConfig(StrictModel):
    """The ``train:`` section of a learned stage's config."""

    cache_exempt: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "keep_checkpoints", "log_every",
                                                        "audit_data"})

    max_steps: int = Field(1000, ge=1)  # optimizer steps
    # The GLOBAL batch: samples per optimizer step over all workers and accumulation micro-batches,
    # as papers state it (DiT: 256). Each worker's micro-batch is batch_size / (workers x grad_accum),
    # which must divide exactly; so the batch is in the cache key and the worker count is not.
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # linear warmup from lr/warmup_steps
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine ends at lr * min_lr_ratio
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 disables
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 (dynamic loss scaling) needs GPUs
    ema_decay: float = Field(0.9999, ge=0, le=1)
    checkpoint_every: int = Field(1000, ge=1)
    # At each checkpoint rank 0 logs the task's preview (a DiT's sample grid) as an MLflow image
    # series (log_image key/step), so the run page shows it improving; false: only the final one.
    preview_at_checkpoints: bool = True
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1)
    max_nonfinite_in_row: int = Field(10, ge=1)
    seed: int = 0
    loader: LoaderConfig = Field(default_factory=LoaderConfig)  # how workers stream their shards
    # Tests and audits: every worker writes the keys of the batches it consumed, per checkpoint
    # interval, under the step's _data_audit/ (exactly-once checks across workers and restarts).
    audit_data: bool = False
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # merged last into the DeepSpeed config

    def micro_batch_size(self, num_workers: int) -> int:
        """Each worker's micro-batch for ``num_workers`` workers; refuses a batch that does not divide."""
        per_step = num_workers * self.grad_accum
        if self.batch_size % per_step:
            raise ValueError(f"train.batch_size {self.batch_size} (the global batch) is not divisible by "
                             f"{num_workers} workers x grad_accum {self.grad_accum}; choose a multiple of {per_step}")
        return self.batch_size // per_step


@runtime_checkable
class TrainTask(Protocol):
    """What a stage trains. Pickled to every worker; hold configs, not tensors.

    Data (one of): ``batch_source(rank, world_size, micro_batch) -> BatchSource`` (see
    ``components.common.stream``: batches with a resumable position, the stages' way), or the
    simple ``batches(epoch, rank, world_size) -> Iterable[dict]`` (the same count on every rank;
    a resumed run re-iterates the epoch up to its position: for small synthetic data).
    Floating tensors of a batch reach ``loss`` in the compute dtype, except those named in an
    optional ``fp32_inputs`` set (targets that must keep full precision under bf16).
    ``after_step(module, step)`` runs on every rank after each optimizer step (whole parameters,
    after the EMA update); ``extra_state() -> dict[str, Tensor]`` is saved with each checkpoint
    (rank 0) and handed back to ``load_extra_state(tensors)`` on every rank at resume: state the
    task keeps beside the model, such as a consistency model's target network.
    """

    def build_model(self) -> "nn.Module": ...

    def loss(self, model: "nn.Module", batch: dict[str, "torch.Tensor"], step: int,
             generator: "torch.Generator") -> tuple["torch.Tensor", dict[str, float]]:
        """(scalar loss, extra metrics). ``model`` is the DeepSpeed engine: call it like the module
        (``model.module`` is the module). ``generator`` is seeded by (seed, step, rank)."""
        ...

    def export(self, model: "nn.Module", ema_model: "nn.Module", out_dir: Path) -> None:
        """Write the stage's weight files (safetensors) into ``out_dir``; rank 0, fp32, CPU."""
        ...


DATA_AUDIT_DIR = "_data_audit"

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class TrainingError(RuntimeError):
    """``fit`` failed; the message carries the first worker's error."""


@dataclass
class FitResult:
    metrics: dict[str, float]  # rank 0's at the end: loss, lr, grad_norm, images_per_s, step, ...
    export_dir: Path  # local copy of what task.export wrote
    checkpoint_uri: str  # the final checkpoint (DeepSpeed state, EMA, train state, export/)

    def run_metrics(self) -> dict[str, float]:
        """What the run went through, for the step's metrics: steps, the step its last attempt
        resumed from (0: none), bad samples and non-finite batches skipped over all workers, and the
        largest peak resident memory of a worker (MiB)."""
        keys = ("step", "resumed_from_step", "bad_samples_skipped", "nonfinite_skipped", "peak_rss_mb", "train_attempts")
        return {("steps" if k == "step" else k): float(self.metrics.get(k, 0)) for k in keys}

    def upload_to(self, storage: "Storage", prefix: str = "") -> list[str]:
        """Copy the exported files into ``storage`` (e.g. ``ctx.output``); their relative paths."""
        written = []
        for path in sorted(p for p in self.export_dir.rglob("*") if p.is_file()):
            rel = "/".join(filter(None, [prefix.strip("/"), path.relative_to(self.export_dir).as_posix()]))
            storage.upload(rel, path)
            written.append(rel)
        return written


# ---------------------------------------------------------------- driver side


def fit(task: TrainTask, cfg: TrainConfig, ctx: "StepContext", name: str = "train") -> FitResult:
    """Train ``task`` on ``ctx.resources.num_workers`` Ray Train workers; see the module docstring."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

    from components.common.parallel import check_pool_fits_cluster
    from components.common.storage import arrow_filesystem
    from components.common.train_loop import ray_worker

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


def system_failure(error: BaseException) -> bool:
    """Whether a failed fit lost a worker (its process or node died, was OOM-killed or preempted):
    worth a restart from the checkpoint. A deterministic error raised by the training code (a
    ValueError, a ConfigError, NonFiniteLossError, a checkpoint refused) would fail the same way
    again, so it fails the step at once."""
    failures = getattr(error, "worker_failures", None) or {}
    pending, visited = [error, *failures.values()], set()
    while pending:
        current = pending.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
        if any(cls.__name__ in SYSTEM_FAILURES for cls in type(current).__mro__):
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
