"""What runs in each training worker: ``train_loop``, and the sessions that give it a rank,
checkpoints and data — ``RaySession`` in a Ray Train worker, ``LocalSession`` in one plain
process (debugging, fast tests)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from components.common import checkpoint
from components.common.checkpoint import TrainState
from components.common.epoch_plan import mix_seed
from components.common.train_batches import DataAudit, batch_source, batch_stream
from components.common.train_types import NonFiniteLossError, TrainConfig, TrainTask

if TYPE_CHECKING:
    import torch

    from components.common.tracking import StepTracker

logger = logging.getLogger(__name__)


class RaySession:
    """Rank, checkpoints and data of a Ray Train worker."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            yield None
        else:
            with found.as_directory() as directory:
                yield Path(directory)

    def report(self, metrics: dict, directory: Path) -> None:
        """Every rank reports (a barrier); Ray Train merges their files into one checkpoint. Every
        rank has files to report, its checkpoint manifest part at least: resume needs all of them
        to tell a rank that wrote nothing from one whose files were lost."""
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         delete_local_checkpoint_after_upload=True)
        shutil.rmtree(directory, ignore_errors=True)


class LocalSession(RaySession):
    """One process, no Ray, checkpoints as numbered directories under ``checkpoint_dir``.
    Creates a one-rank process group if there is none (NCCL with a GPU, gloo without)."""

    def __init__(self, checkpoint_dir: str | Path):
        import os

        import torch
        import torch.distributed as dist

        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # DeepSpeed insists on LOCAL_RANK
        if not dist.is_initialized():
            store = dist.FileStore(str(Path(tempfile.mkdtemp(prefix="latentflow-pg-")) / "store"), 1)
            if torch.cuda.is_available():
                dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
            else:
                dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        self.rank, self.world_size, self.node_id = 0, 1, "local"
        self.root = Path(checkpoint_dir)
        self.reports: list[dict] = []

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = sorted(self.root.glob("checkpoint_*"))
        yield found[-1] if found else None

    def report(self, metrics: dict, directory: Path) -> None:
        self.reports.append(metrics)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(directory), self.root / f"checkpoint_{len(list(self.root.glob('checkpoint_*'))):06d}")



def ray_worker(config: dict) -> None:
    import os

    # This worker process only: MLflow's default HTTP retries (7, doubling) would stall training
    # for minutes at a log step while a tracking server is down; the tracker buffers instead.
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
        os.environ.setdefault(name, value)
    import ray.train

    from components.common.tracking import system_metrics

    context = ray.train.get_context()
    machine_tracker = config["tracker"] if context.get_local_rank() == 0 else None  # one monitor per node
    with system_metrics(machine_tracker, context.get_node_rank()):
        train_loop(config["task"], TrainConfig(**config["train"]), RaySession(), config["tracker"],
                   config.get("audit_uri"), config.get("name", "train"))


def train_loop(task: TrainTask, cfg: TrainConfig, session, tracker: "StepTracker | None",
               audit_uri: str | None = None, name: str = "train") -> dict:
    """Build, resume, train to ``cfg.max_steps``, export. Returns the final checkpoint's metrics.
    ``name``: what the progress bar calls this training (a distill round: round_1, ...)."""
    import torch

    from components.common.ema import EMA
    from components.common.engine import build_engine

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world = session.rank, session.world_size
    torch.manual_seed(cfg.seed)
    engine = build_engine(task.build_model(), cfg, world)
    with checkpoint.gathered(engine):
        ema = EMA(engine.module, cfg.ema_decay) if rank == 0 else None
    state = TrainState(world_size=world)
    with session.latest_checkpoint() as found:
        if found is not None:
            state = checkpoint.restore(engine, ema, found, world, task)
            state.resumed_from_step = state.step
            logger.info("rank %d resumed from %s at step %d (epoch %d, data position %d)", rank, found,
                        state.step, state.epoch, state.data_position)
    source = batch_source(task, cfg, session)
    audit = DataAudit(audit_uri, rank, session.node_id, state.step) if audit_uri else None
    try:
        _train_steps(task, cfg, session, tracker, engine, ema, state, batch_stream(source, state, audit), audit,
                     name)
    finally:
        source.close()
    return _save(session, engine, ema, state, task, audit, export=lambda out: _export(task, engine, ema, out, rank))


def _train_steps(task, cfg: TrainConfig, session, tracker, engine, ema, state: TrainState, batches, audit,
                 name: str = "train") -> None:
    """The loop, top to bottom: batch, forward, loss, finite-check, backward, clip, step, EMA, log."""
    from components.common.engine import grad_norm as own_grad_norm, needs_own_grad_norm
    from components.common.progress import progress_bar

    rank, world = session.rank, session.world_size
    window = _Window()
    channel = tracker.progress if tracker is not None else None
    bar = progress_bar(cfg.max_steps, desc=name, unit="step", channel=channel) if rank == 0 else None
    if bar is not None:
        bar.update(state.step)
    nonfinite_in_row, grad_norm = 0, float("nan")
    keep_fp32 = frozenset(getattr(task, "fp32_inputs", ()))
    while state.step < cfg.max_steps:
        micro = 0
        while micro < cfg.grad_accum:
            batch = _to_device(next(batches), engine, keep_fp32)                       # batch
            generator = _step_generator(cfg.seed, state.step, rank, engine.device)
            loss, extras = task.loss(engine, batch, state.step, generator)             # forward, loss
            mean_loss = _agreed_loss(loss, world)                                      # finite-check
            if mean_loss is None:
                state.nonfinite_skipped += 1
                nonfinite_in_row += 1
                if nonfinite_in_row >= cfg.max_nonfinite_in_row:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} non-finite losses in a row at step {state.step} "
                        f"(max_nonfinite_in_row={cfg.max_nonfinite_in_row}); lower the learning "
                        "rate, enable grad_clip, or check the data")
                continue
            nonfinite_in_row = 0
            engine.backward(loss)                                                      # backward
            if engine.is_gradient_accumulation_boundary() and needs_own_grad_norm(engine):
                grad_norm = own_grad_norm(engine)
            engine.step()                                                              # clip, update
            micro += 1
            rows = len(next(v for v in batch.values() if _is_tensor(v))) * world
            state.samples_seen += rows
            window.add(mean_loss, extras, rows)
        state.step += 1
        grad_norm = _float(engine.get_global_grad_norm(), grad_norm)
        with checkpoint.gathered(engine):                                              # EMA
            if ema is not None:
                ema.update(engine.module)
            if callable(getattr(task, "after_step", None)):  # e.g. a consistency model's target network
                task.after_step(engine.module, state.step)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:             # log
            state.last_metrics = window.summary(engine.get_lr()[0], grad_norm, state)
            if rank == 0 and tracker is not None:
                tracker.log_metrics(state.last_metrics, step=state.step)
        if bar is not None:  # the driver's view shows the latest window's loss and throughput
            bar.update(1, **{k: state.last_metrics[k] for k in ("loss", "images_per_s") if k in state.last_metrics})
        if state.step % cfg.checkpoint_every == 0 and state.step < cfg.max_steps:
            _save(session, engine, ema, state, task, audit)
            if cfg.preview_at_checkpoints:
                _log_preview(task, ema, tracker, state.step)
    if bar is not None:
        bar.close()


def _log_preview(task: TrainTask, ema, tracker, step: int) -> None:
    """Rank 0 (the one with the EMA): the task's preview as an image series; never fails training."""
    if ema is None or tracker is None or not tracker.enabled or not callable(getattr(task, "preview", None)):
        return
    try:
        drawn = task.preview(ema)
    except Exception as e:  # noqa: BLE001 - a picture is not worth a failed step
        logger.warning("preview at step %d failed (%s: %s); training goes on", step, type(e).__name__, e)
        return
    if drawn is not None:
        key, image = drawn
        tracker.log_image(image, key=key, step=step)


def _save(session, engine, ema, state: TrainState, task: TrainTask, audit: "DataAudit | None",
          export: Callable[[Path], None] | None = None) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="latentflow-ckpt-"))
    checkpoint.save(engine, ema, state, directory, session.rank, task, export)  # export/ goes into the manifest
    metrics = {**state.last_metrics, "step": state.step, "samples_seen": state.samples_seen,
               "nonfinite_skipped": state.nonfinite_skipped, "bad_samples_skipped": _sum_over_ranks(state.bad_samples),
               "resumed_from_step": state.resumed_from_step, "peak_rss_mb": _peak_rss_mb_over_ranks()}
    if audit is not None:
        audit.commit(state.step)  # what this checkpoint has consumed, before it becomes the latest
    session.report(metrics, directory)
    return metrics


def _export(task: TrainTask, engine, ema, out_dir: Path, rank: int) -> None:
    weights = checkpoint.full_state_dict(engine)  # collective under ZeRO-3
    if rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    model = task.build_model().float()
    model.load_state_dict(weights)
    ema_model = ema.copy_to(task.build_model().float())
    task.export(model.eval(), ema_model.eval(), out_dir)


# ---------------------------------------------------------------- loop helpers


def _to_device(batch: dict, engine, keep_fp32: frozenset[str] = frozenset()) -> dict:
    """Tensors to the engine's device; floating ones cast to the compute dtype, except the task's
    ``fp32_inputs`` (targets that must not lose precision under bf16)."""
    from components.common.engine import compute_dtype

    dtype = compute_dtype(engine)
    return {k: v.to(engine.device, dtype=dtype if v.is_floating_point() and k not in keep_fp32 else None)
            if _is_tensor(v) else v for k, v in batch.items()}


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _step_generator(seed: int, step: int, rank: int, device) -> "torch.Generator":
    import torch

    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, rank))


def _agreed_loss(loss: "torch.Tensor", world_size: int) -> float | None:
    """The loss averaged over ranks, or None when it is not finite on some rank. Every rank gets
    the same answer, so all skip (or all take) the update together."""
    import torch
    import torch.distributed as dist

    if loss.numel() != 1:
        raise ValueError(f"task.loss must return a scalar, got shape {tuple(loss.shape)}")
    value = loss.detach().float().reshape(())
    finite = torch.isfinite(value)
    packed = torch.stack([torch.where(finite, value, torch.zeros_like(value)), (~finite).float()])
    dist.all_reduce(packed)
    total, nonfinite = packed.tolist()
    return None if nonfinite > 0 else total / world_size


def _sum_over_ranks(value: int) -> int:
    """Collective: every rank calls it (from ``_save``)."""
    import torch
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def _peak_rss_mb_over_ranks() -> float:
    """The largest peak resident memory of any worker process so far, in MiB (collective). What
    ``benchmarks/data_scaling.py`` compares across data set sizes: it must not grow with them."""
    import resource

    import torch
    import torch.distributed as dist

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


def _float(value, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


class _Window:
    """Averages over one logging window: loss, the task's extra metrics, throughput."""

    def __init__(self):
        self.start, self.samples, self.losses, self.extras = time.perf_counter(), 0, [], {}

    def add(self, loss: float, extras: dict, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples
        for key, value in extras.items():
            self.extras.setdefault(key, []).append(_float(value, float("nan")))

    def summary(self, lr: float, grad_norm: float, state: TrainState) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {key: sum(v) / len(v) for key, v in self.extras.items()}
        out.update(loss=sum(self.losses) / max(1, len(self.losses)), lr=float(lr), grad_norm=grad_norm,
                   images_per_s=self.samples / elapsed, epoch=float(state.epoch),
                   nonfinite_skipped=float(state.nonfinite_skipped))
        self.__init__()
        return out
