"""Does the data path scale? Worker memory against data set size, the loader against the trainer,
and the cost of resuming late in an epoch against early.

Builds synthetic class folders of N and 4N 256 px RGB images (JPEG, shapes and gradients, so they
decode like photos rather than like flat colour), and runs shard -> autoencoder (at a 64 px base)
-> a 64 -> 128 super-resolution stage on each, the same number of training steps at both sizes.
Then prints, side by side, from one run:

1. the peak resident memory of the training workers (the trainer's ``peak_rss_mb``, the largest
   over workers) at N and 4N, and 4N / N (target <= 1.10: memory must not grow with the data);
2. the loader's samples/s (one worker's ``ShardSource`` over the 4N shards with the SR stage's
   decoder and pair transform, nothing else running) against the samples/s one SR worker consumes
   while training (its ``images_per_s`` / workers) (target >= 3x: data is never the bottleneck);
3. the time from opening a stream at 90% of an epoch to its first batch against at 10%, over
   interleaved rounds (target: equal within noise: a resumed worker reads nothing it consumed);
4. for the choice of engine, the same one-worker loader built on Ray Data (``read_webdataset`` ->
   ``map_batches`` decode and pairs -> ``iter_torch_batches``, what the trainer used before): its
   samples/s, and its time to the first batch at 10% and 90% of an epoch when a resume must skip
   the consumed batches (Ray Data keeps no position: ray-project/ray#48224).

Not a test: run it by hand on a quiet machine (no test run or other benchmark beside it).

    .venv/bin/python benchmarks/data_scaling.py [--n 500] [--steps 40] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = 4


def synthetic_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 256 px RGB JPEGs in CLASSES class folders: a gradient, shapes and noise each."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 256, dtype=np.float32)
    for i in range(count):
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.uniform(0, 255, 3)
        base = (ramp[None, :, None] * tint + ramp[:, None, None] * (255 - tint)) / 2
        pixels = np.clip(base + rng.normal(0, 12, (256, 256, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, 220, 2)
            draw.ellipse([x, y, x + rng.integers(10, 60), y + rng.integers(10, 60)],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def config_text(name: str, source: Path, root: Path, steps: int) -> str:
    """shard -> autoencoder (64 px base) -> SR 64 -> 128; 2 workers of 1 CPU each per learned step."""
    train = f"{{max_steps: {steps}, batch_size: 16, lr: 1.0e-3, ema_decay: 0.9, log_every: {steps}, " \
            f"checkpoint_every: {steps}}}"
    return f"""name: {name}
storage: {{root: {root}}}
shard:
  resources: {{num_cpus: 0.25, num_workers: 2, cpus_per_worker: 0.5}}
  source: {source}
  image_size: 256
  channels: 3
  image_format: jpg
  samples_per_shard: 100
  val_fraction: 0.05
autoencoder:
  resources: {{num_cpus: 0, num_workers: 2, cpus_per_worker: 1}}
  preset: ae-tiny
  image_size: 64
  scale_estimate_samples: 64
  val_samples: 16
  train: {train}
superres:
  - resources: {{num_cpus: 0, num_workers: 2, cpus_per_worker: 1}}
    input_size: 64
    output_size: 128
    preset: sr-tiny
    train: {train}
    sample: {{steps: 2}}
    eval_samples: 8
    grid_samples: 4
"""


def run_pipeline(work: Path, count: int, steps: int) -> dict:
    source = synthetic_folder(work / f"images-{count}", count)
    config = work / f"scaling-{count}.yaml"
    config.write_text(config_text(f"scaling{count}", source, work / f"out-{count}", steps))
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config), "--workflow-id", "scale"],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the pipeline on {count} images failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    from components.common.step import read_manifest_at

    summary = json.loads((work / f"out-{count}" / "workflows" / "scale" / "summary.json").read_text())
    return {s["name"]: read_manifest_at(s["manifest_uri"]) for s in summary["steps"]}


def sr_source(manifests: dict, position_rank: int = 0):
    """The SR stage's own stream of one worker (of 2), as its training task builds it."""
    from components.common.data import ImageDecoder, image_split
    from components.common.stream import LoaderConfig, ShardSource
    from components.superres.config import SuperResConfig
    from components.superres.task import PairMaker

    shard = manifests["shard"]
    cfg = SuperResConfig(**manifests["superres_1"].config)
    return ShardSource(image_split(shard, "train"), ImageDecoder(shard.info["image_format"]), 8, cfg.train.seed,
                       position_rank, 2, LoaderConfig(), PairMaker(cfg))


def loader_rate(manifests: dict, batches: int = 40) -> float:
    """Samples/s of one worker's stream alone (epochs back to back)."""
    source = sr_source(manifests)
    produced, epoch, started = 0, 0, time.perf_counter()
    try:
        while produced < batches:
            for batch in source.epoch(epoch, 0, 0):
                produced += 1
                if produced == batches:
                    break
            epoch += 1
    finally:
        source.close()
    return batches * 8 / (time.perf_counter() - started)


def time_to_first_batch(manifests: dict, fraction: float) -> float:
    source = sr_source(manifests)
    plan = source.plan(0)
    done = int(fraction * (plan.span_length // 8))  # batches already consumed before the "crash"
    started = time.perf_counter()
    try:
        next(iter(source.epoch(0, done * 8, done)))
    finally:
        source.close()
    return time.perf_counter() - started


class RayDataPairs:
    """Ray Data ``map_batches`` function: webdataset columns -> the SR stage's (high, low) pairs."""

    def __init__(self, cfg_data: dict, image_key: str):
        from components.superres.config import SuperResConfig

        self.cfg, self.image_key = SuperResConfig(**cfg_data), image_key

    def __call__(self, batch: dict) -> dict:
        import torch

        from components.common.data import decode_image
        from components.superres.task import training_pair

        images = torch.from_numpy(np.stack([decode_image(data) for data in batch[self.image_key]]))
        high, low = training_pair(images, self.cfg)
        return {"high": high.numpy(), "low": low.numpy()}


def ray_data_loader(manifests: dict, skip_batches: int = 0, batches: int | None = None) -> tuple[float, float]:
    """(seconds to the first batch after skipping ``skip_batches``, samples/s of ``batches`` batches)
    through Ray Data, one worker, the shards of the 4N set."""
    import ray.data

    shard = manifests["shard"]
    root, image_key = shard.output_uri, shard.info["image_format"]
    started = time.perf_counter()
    ds = ray.data.read_webdataset([f"{root}/{rel}" for rel in shard.info["train_shards"]], decoder=None,
                                  suffixes=[image_key])
    ds = ds.map_batches(RayDataPairs, fn_constructor_args=(manifests["superres_1"].config, image_key),
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
    stream = iter(ds.iter_torch_batches(batch_size=8, drop_last=True))
    for _ in range(skip_batches + 1):  # no position to start from: read and decode the consumed part again
        next(stream)
    first = time.perf_counter() - started
    if not batches:
        return first, 0.0
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return first, batches * 8 / (time.perf_counter() - started)


def compare_ray_data(large: dict) -> None:
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset progress reports

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    try:
        span_batches = (sum(large["shard"].info["train_counts"]) // 2) // 8  # one worker of 2's epoch
        _, rate = ray_data_loader(large, 0, 40)
        early, _ = ray_data_loader(large, int(0.1 * span_batches))
        late, _ = ray_data_loader(large, int(0.9 * span_batches))
    finally:
        ray.shutdown()
    print(f"\n4. the same loader on Ray Data: {rate:.1f} samples/s; resume (skipping) to the first batch at 10% "
          f"{early:.1f} s, at 90% {late:.1f} s   ratio {late / early:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="images in the smaller set (the larger has 4x)")
    parser.add_argument("--steps", type=int, default=40, help="training steps of each learned step")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the resume timing")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="latentflow-scaling-"))
    runs = {count: run_pipeline(work, count, args.steps) for count in (args.n, 4 * args.n)}
    small, large = runs[args.n], runs[4 * args.n]

    print(f"\n1. peak RSS of the training workers (MiB), {args.n} vs {4 * args.n} images, {args.steps} steps each")
    for step in ("autoencoder", "superres_1"):
        a, b = small[step].metrics["peak_rss_mb"], large[step].metrics["peak_rss_mb"]
        print(f"   {step:<12} {a:>8.1f} {b:>8.1f}   ratio {b / a:.3f}   (target <= 1.10)")

    import torch

    torch.set_num_threads(1)  # as a worker of 1 CPU has
    loader = loader_rate(large)
    trainer = large["superres_1"].metrics["images_per_s"] / 2  # per worker: 2 workers
    print(f"\n2. one SR worker: loader {loader:.1f} samples/s alone, trainer consumes {trainer:.1f} samples/s"
          f"   ratio {loader / trainer:.1f}x   (target >= 3)")

    early, late = [], []
    for _ in range(args.rounds):  # interleaved, so drift of the machine hits both alike
        early.append(time_to_first_batch(large, 0.1))
        late.append(time_to_first_batch(large, 0.9))
    e, lt = statistics.median(early), statistics.median(late)
    spread = max(statistics.pstdev(early), statistics.pstdev(late))
    print(f"\n3. resume to first batch, median of {args.rounds}: at 10% {1000 * e:.1f} ms, at 90% {1000 * lt:.1f} ms"
          f"   ratio {lt / e:.2f}   (spread {1000 * spread:.1f} ms; target: equal within noise)")
    compare_ray_data(large)
    print(f"\nwork directory: {work}")


if __name__ == "__main__":
    main()
