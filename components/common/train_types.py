"""The trainer's types: a stage's ``train:`` section, what a stage trains (``TrainTask``), what
``fit`` returns, and its errors. No torch, no Ray, nothing of the trainer's machinery: every
stage's config imports ``TrainConfig``, and loading a config must stay cheap (see
``components/common/trainer.py`` for how these are used)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from components.common.config import StrictModel
from components.common.stream import LoaderConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

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


DATA_AUDIT_DIR = "_data_audit"  # see TrainConfig.audit_data


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
