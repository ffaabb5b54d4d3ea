"""The one trainer of every learned stage: Ray Train workers, each driving a DeepSpeed engine.

A stage describes *what* to train with a ``TrainTask`` (model, loss, export) and a ``TrainConfig``
(its ``train:`` section), then calls ``fit``. The trainer owns *how*: ZeRO stage, precision,
clipping, accumulation, EMA, checkpoints, resume, non-finite losses, logging.

- Resume: re-running a step uses the same Ray Train ``RunConfig(storage_path=ctx.checkpoint_uri,
  name=...)``, so ``ray.train.get_checkpoint()`` returns the latest checkpoint and the run ends at
  the same ``max_steps``; ``FailureConfig(max_failures=ctx.resources.max_retries)`` restarts
  crashed workers from it within one ``fit``. Resuming needs the same ``num_workers``.
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

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from components.common import checkpoint
from components.common.config import StrictModel

if TYPE_CHECKING:
    import torch
    from torch import nn

    from components.common.step import StepContext
    from components.common.storage import Storage


class TrainConfig(StrictModel):
    """The ``train:`` section of a learned stage's config."""

    cache_exempt: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "keep_checkpoints", "log_every"})

    max_steps: int = Field(1000, ge=1)  # optimizer steps
    batch_size: int = Field(32, ge=1)  # per worker and micro-batch
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
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1)
    max_nonfinite_in_row: int = Field(10, ge=1)
    seed: int = 0
    shuffle_buffer: int | None = Field(None, ge=1)  # rows; None: 8 batches
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # merged last into the DeepSpeed config


@runtime_checkable
class TrainTask(Protocol):
    """What a stage trains. Pickled to every worker; hold configs, not tensors.

    Optional: ``batches(epoch, rank, world_size) -> Iterable[dict]`` yields this worker's batches
    of one epoch (the same count on every rank) when the data is not a Ray Dataset named "train".
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


class NonFiniteLossError(RuntimeError):
    pass


class TrainingError(RuntimeError):
    """``fit`` failed; the message carries the first worker's error."""


@dataclass
class FitResult:
    metrics: dict[str, float]  # rank 0's at the end: loss, lr, grad_norm, images_per_s, step, ...
    export_dir: Path  # local copy of what task.export wrote
    checkpoint_uri: str  # the final checkpoint (DeepSpeed state, EMA, train state, export/)

    def upload_to(self, storage: "Storage", prefix: str = "") -> list[str]:
        """Copy the exported files into ``storage`` (e.g. ``ctx.output``); their relative paths."""
        written = []
        for path in sorted(p for p in self.export_dir.rglob("*") if p.is_file()):
            rel = "/".join(filter(None, [prefix.strip("/"), path.relative_to(self.export_dir).as_posix()]))
            storage.upload(rel, path)
            written.append(rel)
        return written


# ---------------------------------------------------------------- driver side


def fit(task: TrainTask, cfg: TrainConfig, ctx: "StepContext", datasets: dict | None = None,
        name: str = "train") -> FitResult:
    """Train ``task`` on ``ctx.resources.num_workers`` Ray Train workers; see the module docstring.
    ``datasets``: Ray Datasets, split equally between workers; the loop reads "train"."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

    from components.common import data
    from components.common.train_loop import ray_worker

    res = ctx.resources
    use_gpu = res.gpus_per_worker > 0
    if cfg.precision == "fp16" and not use_gpu:
        raise ValueError("train.precision fp16 needs GPUs (DeepSpeed: 'fp16 is not supported' on CPU); "
                         "use bf16 or fp32")
    datasets = dict(datasets or {})
    if "train" not in datasets and not callable(getattr(task, "batches", None)):
        raise ValueError("fit needs datasets={'train': ...} or a task with a batches() method")
    if datasets and ray.is_initialized():
        spare = ray.cluster_resources().get("CPU", 0) - res.num_workers * res.cpus_per_worker
        if spare < 1:
            warnings.warn(f"{res.num_workers} workers x {res.cpus_per_worker} CPU leave {spare:g} CPU "
                          "for Ray Data's readers: training may wait forever for data. Lower "
                          "cpus_per_worker (fractions are fine) or add CPUs.", stacklevel=2)
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    filesystem, storage_path = data.arrow_filesystem(ctx.checkpoint_uri)
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"task": task, "train": cfg.model_dump(), "tracker": ctx.tracker},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage_path, storage_filesystem=filesystem, name=name,
                             failure_config=FailureConfig(max_failures=res.max_retries),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets=datasets, dataset_config=data.ingest_config(deterministic=True),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        failures = getattr(e, "worker_failures", None) if isinstance(e, WorkerGroupError) else None
        first = next(iter(failures.values())) if failures else e
        raise TrainingError(f"step {ctx.step!r}: training failed: {first}") from e
    final = result.checkpoint
    uri = f"s3://{final.path}" if ctx.checkpoint_uri.startswith("s3://") else final.path
    return FitResult(metrics=dict(result.metrics or {}), export_dir=_fetch_export(result, ctx), checkpoint_uri=uri)


def _fetch_export(result, ctx: "StepContext") -> Path:
    """Copy only export/ out of the final checkpoint (not the optimizer state)."""
    import pyarrow.fs

    local = ctx.scratch_dir() / checkpoint.EXPORT_DIR
    local.mkdir()
    source = f"{result.checkpoint.path.rstrip('/')}/{checkpoint.EXPORT_DIR}"
    pyarrow.fs.copy_files(source, str(local), source_filesystem=result.checkpoint.filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local
