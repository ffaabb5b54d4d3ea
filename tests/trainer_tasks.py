"""The trainer tests' toy tasks (a regression, the same as a stream, a classifier of streamed
shards, each with knobs that inject faults) and the helpers that read what a run left behind.
A module of its own, not the test file, so Ray workers unpickle the tasks by this name (tests/
is on their PYTHONPATH, see conftest)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from components.common.config import StepResources
from components.common.step import StepContext
from components.common.storage import Storage
from components.common.tracking import StepTracker

IN, ROWS = 8, 256
TRUE_W = torch.linspace(-1, 1, IN)


def regression_data(rows=ROWS, seed=0):
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed))
    return x, (x @ TRUE_W).unsqueeze(1)


class Regression:
    """y = x @ w with a small MLP. Knobs inject faults; ``log_dir`` records (rank, step, loss)."""

    def __init__(self, batch_size=16, log_dir=None, nan_at_step=None, nan_times=1, nan_rank=None,
                 fail_at_step=None, die_at_step=None, marker=None, in_memory=True):
        self.batch_size, self.log_dir = batch_size, log_dir
        self.nan_at_step, self.nan_times, self.nan_rank = nan_at_step, nan_times, nan_rank
        self.fail_at_step, self.die_at_step, self.marker = fail_at_step, die_at_step, marker
        self.in_memory = in_memory
        self._nans = 0

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, 1))

    def batches(self, epoch, rank, world_size):
        x, y = regression_data()
        order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(epoch))
        mine = order[rank::world_size]
        for i in range(len(mine) // self.batch_size):
            index = mine[i * self.batch_size:(i + 1) * self.batch_size]
            yield {"x": x[index], "y": y[index]}

    def loss(self, model, batch, step, generator):
        rank = torch.distributed.get_rank()
        if self.die_at_step == step and rank == 1 and not Path(self.marker).exists():
            Path(self.marker).touch()
            # Ray Train registers a reported checkpoint when its controller next polls the workers
            # (every 0.5 s: trainer.HEALTH_CHECK_INTERVAL; 3 s leaves room on a loaded machine); a
            # worker that dies sooner takes the registration with it.
            time.sleep(3)
            os._exit(1)  # a worker process dies without a word
        if self.fail_at_step is not None and step >= self.fail_at_step:
            raise RuntimeError(f"injected crash at step {step}")
        loss = nn.functional.mse_loss(model(batch["x"]).float(), batch["y"].float())
        if self.nan_at_step is not None and step >= self.nan_at_step and self._nans < self.nan_times \
                and self.nan_rank in (None, rank):
            self._nans += 1
            loss = loss * float("nan")
        if self.log_dir:
            with open(Path(self.log_dir) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
        with torch.no_grad():
            abs_err = float((model(batch["x"]).float() - batch["y"]).abs().mean())
        return loss, {"abs_err": abs_err}

    def export(self, model, ema_model, out_dir):
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(out_dir / "model.safetensors"))
        save_file(ema_model.state_dict(), str(out_dir / "ema.safetensors"))


class RegressionStream(Regression):
    """The same data as a BatchSource (the stages' way): a seeded plan over tensors in memory."""

    batches = None

    def batch_source(self, rank, world_size, micro_batch):
        from components.common.stream import TensorSource

        x, y = regression_data()
        return TensorSource({"x": x, "y": y}, micro_batch, seed=0, rank=rank, world_size=world_size)


class ShardClassifier:
    """A linear classifier of the 2x2 "latents" of tests/test_stream.py's shards, streamed from them
    (local or S3) like a stage's data; ``die_at_step`` kills rank 1 once, ``log_dir`` records losses."""

    def __init__(self, location, rels, counts, die_at_step=None, marker=None, log_dir=None):
        self.location, self.rels, self.counts = location, list(rels), list(counts)
        self.die_at_step, self.marker, self.log_dir = die_at_step, marker, log_dir

    def build_model(self):
        return nn.Linear(4, 3)

    def batch_source(self, rank, world_size, micro_batch):
        from components.common.data import LatentDecoder
        from components.common.sample_reader import SplitSpec
        from components.common.stream import LoaderConfig, ShardSource

        spec = SplitSpec(self.location, tuple(self.rels), tuple(self.counts), ("latent.npy",), ("cls",), "fail", "toy")
        return ShardSource(spec, LatentDecoder(), micro_batch, 0, rank, world_size, LoaderConfig(shuffle_window=32))

    def loss(self, model, batch, step, generator):
        rank = torch.distributed.get_rank()
        if self.die_at_step == step and rank == 1 and not Path(self.marker).exists():
            Path(self.marker).touch()
            time.sleep(3)  # let Ray Train register the last checkpoint (see Regression.loss)
            os._exit(1)
        x = batch["latent"].float().flatten(1) / 500.0
        loss = nn.functional.cross_entropy(model(x).float(), batch["label"].long())
        if self.log_dir:
            with open(Path(self.log_dir) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
        return loss, {}

    def export(self, model, ema_model, out_dir):
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(out_dir / "model.safetensors"))
        save_file(ema_model.state_dict(), str(out_dir / "ema.safetensors"))


def logged(log_dir, rank=0):
    path = Path(log_dir) / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def make_ctx(tmp_path, tracker=None, workers=2, retries=0, root=None) -> StepContext:
    root = root or str(tmp_path)
    output = Storage.from_uri(f"{root}/out")
    return StepContext(step="toy", workflow_id="wf", cache_key="k", root=Storage.from_uri(root),
                       output=output, tracker=tracker or StepTracker("sqlite:///unused.db", None),
                       resources=StepResources(num_workers=workers, cpus_per_worker=0.5, max_retries=retries))


def sqlite_tracker(tmp_path) -> StepTracker:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("trainer-test"))
    return StepTracker(uri, run.info.run_id)


def history(tracker: StepTracker, key: str) -> list[float]:
    return [m.value for m in sorted(tracker.client.get_metric_history(tracker.run_id, key), key=lambda m: m.step)]


def ema_updates(path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["updates"])
