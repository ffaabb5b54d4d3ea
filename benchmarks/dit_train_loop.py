"""Images/s and model-FLOPs utilisation of the DiT step's own training loop, on one device.

This runs exactly what a DiT training worker runs — ``train_loop`` with the DiT task's loss (random
t, noise and label dropout; the diffusion arithmetic in fp32), the DeepSpeed engine built from a
``TrainConfig`` (ZeRO stage, precision, clipping, AdamW: torch's fused CUDA kernel on GPUs), the
EMA update after every step, the final checkpoint and export — in one process (``LocalSession``:
NCCL with a GPU, gloo without) instead of a Ray Train worker, so a bare GPU machine needs only
torch, DeepSpeed and pydantic. The data are random latents held in memory: this measures the
model, the optimizer and the loop, not the loader.

Images/s is that of the last logging window (the first window holds warm-up and is printed too).
MFU = images/s x 3 x forward matmul FLOPs per image / peak; the peak is the dense bf16 tensor peak
by device name (H100/H200 989 TFLOP/s, A100 312) or --peak-tflops.

  python benchmarks/dit_train_loop.py                     # CPU: DiT-Micro/2, 8x8x4 latents
  python benchmarks/dit_train_loop.py --preset DiT-XL/2 --latent-size 32 --batch 64 \\
      --precision bf16 --zero-stage 2 --steps 60 --window 20   # one GPU: the ImageNet-256 recipe's model
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.common.train_loop import LocalSession, train_loop  # noqa: E402
from components.dit.config import DitConfig  # noqa: E402
from components.dit.model import DiT, dit_flops_per_image  # noqa: E402
from components.dit.task import LatentDitTask  # noqa: E402
from components.dit.train import build_step_dit  # noqa: E402

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-Micro/2", help="DiT preset (default DiT-Micro/2)")
    parser.add_argument("--latent-size", type=int, default=8, help="latent height = width (default 8)")
    parser.add_argument("--latent-channels", type=int, default=4, help="latent channels (default 4)")
    parser.add_argument("--num-classes", type=int, default=1000, help="class count (default 1000)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps in all (default 30)")
    parser.add_argument("--window", type=int, default=10, help="steps per logging window (default 10)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default 2)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    cfg = DitConfig(preset=args.preset, train=dict(
        max_steps=args.steps, batch_size=args.batch, precision=args.precision, zero_stage=args.zero_stage,
        log_every=args.window, checkpoint_every=10 * args.steps, ema_decay=0.9999, warmup_steps=10))
    model_kwargs = build_step_dit(cfg, (args.latent_channels, args.latent_size, args.latent_size),
                                  args.num_classes).arguments
    generator = torch.Generator().manual_seed(0)
    rows = args.batch * (args.steps + 1)  # one epoch covers the run
    latents = torch.randn(rows, args.latent_channels, args.latent_size, args.latent_size, generator=generator)
    labels = torch.randint(0, args.num_classes, (rows,), generator=generator)
    task = LatentDitTask(cfg=cfg, model_kwargs=model_kwargs, meta={"preset": args.preset},
                         in_memory=(latents, labels))

    windows: list[dict] = []

    class Recorder:  # stands in for the step's MLflow tracker
        progress, enabled = None, False  # no console channel, no MLflow previews

        def log_metrics(self, metrics, step):
            windows.append({**metrics, "step": step})

    with tempfile.TemporaryDirectory(prefix="latentflow-bench-") as checkpoints:
        session = LocalSession(checkpoints)
        started = time.perf_counter()
        train_loop(task, cfg.train, session, Recorder())
        total = time.perf_counter() - started

    probe = DiT(**model_kwargs)
    flops = dit_flops_per_image(probe)
    params = sum(p.numel() for p in probe.parameters())
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = args.peak_tflops
    if peak is None and on_gpu and args.precision == "bf16":
        peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in device), None)
    print(f"device={device} torch={torch.__version__} preset={args.preset} params={params / 1e6:.1f}M "
          f"latent={args.latent_channels}x{args.latent_size}x{args.latent_size} batch={args.batch} "
          f"precision={args.precision} zero={args.zero_stage}")
    print(f"forward FLOPs/image {flops / 1e9:.3f} GFLOP; training ~3x")
    for window in windows:
        achieved = window["images_per_s"] * 3 * flops / 1e12
        line = (f"steps ..{window['step']:>4}: {window['images_per_s']:9.1f} images/s  {achieved:8.2f} TFLOP/s  "
                f"loss {window['loss']:.4f}")
        if peak:
            line += f"  MFU {achieved / peak:6.2%}"
        print(line)
    if on_gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"whole loop incl. build, final checkpoint and export: {total:.1f} s")


if __name__ == "__main__":
    main()
