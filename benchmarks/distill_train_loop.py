"""Images/s and model-FLOPs utilisation of the distill step's training loops, on one device.

Like ``dit_train_loop.py`` for the DiT: the distill step's own tasks run through ``train_loop``
(DeepSpeed engine from a ``TrainConfig``: ZeRO stage, precision, fused AdamW on GPUs; EMA; final
checkpoint and export) in one process, on random latents held in memory:

- ``progressive``: round 1 of progressive distillation, the classifier-free-guided teacher folded
  in. Per image: the student's forward and backward (3 F) and the teacher's two guided DDIM steps
  (2 steps x 2 forwards = 4 F): 7 F.
- ``consistency``: consistency distillation with a Heun step of the guided teacher's PF-ODE. Per
  image: the online network's forward and backward (3 F), the target network's forward (F) and the
  teacher's Heun step (2 evaluations x 2 forwards = 4 F): 8 F.

F is the DiT's forward matmul FLOPs per image; MFU = images/s x FLOPs / peak (dense bf16 by device
name, or --peak-tflops). The teacher is a DiT of the preset's size with random weights (perturbed,
so that adaLN-Zero does not make it output zeros): this measures cost, not quality.

  python benchmarks/distill_train_loop.py                  # CPU: DiT-Micro/2 on 8x8x4 latents
  python benchmarks/distill_train_loop.py --preset DiT-XL/2 --latent-size 32 --batch 64 \\
      --precision bf16 --zero-stage 2 --steps 30 --window 10   # one GPU
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
from benchmarks.dit_train_loop import PEAK_TFLOPS_BF16  # noqa: E402
from components.common.train_loop import LocalSession, train_loop  # noqa: E402
from components.diffusion import NoiseSchedule, spaced_timesteps  # noqa: E402
from components.distill.config import DistillConfig  # noqa: E402
from components.distill.consistency import consistency_levels  # noqa: E402
from components.distill.targets import halve_steps  # noqa: E402
from components.distill.task import ConsistencyTask, ProgressiveTask  # noqa: E402
from components.dit.config import DitConfig  # noqa: E402
from components.dit.model import DiT, dit_flops_per_image  # noqa: E402
from components.dit.train import build_step_dit  # noqa: E402

FORWARDS_PER_IMAGE = {"progressive": 7, "consistency": 8}
GUIDANCE = 4.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["progressive", "consistency", "both"], default="both")
    parser.add_argument("--preset", default="DiT-Micro/2", help="DiT preset (default DiT-Micro/2)")
    parser.add_argument("--latent-size", type=int, default=8, help="latent height = width (default 8)")
    parser.add_argument("--num-classes", type=int, default=1000, help="class count (default 1000)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--window", type=int, default=10, help="steps per logging window (default 10)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default 2)")
    return parser.parse_args()


def teacher(directory: Path, args) -> tuple[tuple[str, str], dict, dict]:
    """A random DiT saved as the DiT step saves it: (weights ref, meta, model kwargs)."""
    from safetensors.torch import save_file

    cfg = DitConfig(preset=args.preset, prediction="v")
    kwargs = build_step_dit(cfg, (4, args.latent_size, args.latent_size), args.num_classes).arguments
    torch.manual_seed(0)
    dit = DiT(**kwargs)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(directory / "dit.safetensors"))
    meta = {"model": kwargs, "schedule": "linear", "num_timesteps": 1000, "prediction": "v",
            "learn_sigma": kwargs["learn_sigma"], "num_classes": args.num_classes, "null_label": dit.null_class_id,
            "latent_shape": [4, args.latent_size, args.latent_size], "guidance": GUIDANCE,
            "teacher_cfg_weight": GUIDANCE}
    return (str(directory), "dit.safetensors"), meta, kwargs


def build_task(method: str, ref, meta: dict, args, data):
    train = dict(max_steps=args.steps, batch_size=args.batch, precision=args.precision, zero_stage=args.zero_stage,
                 log_every=args.window, checkpoint_every=10 * args.steps, ema_decay=0.999, warmup_steps=5, lr=1e-4)
    if method == "progressive":
        cfg = DistillConfig(method="progressive", progressive={"start_steps": 64, "end_steps": 4}, train=train)
        levels = spaced_timesteps(1000, 64, "trailing")
        meta = {**meta, "method": "progressive", "round": 1, "teacher_steps": 64, "native_steps": 32,
                "teacher_levels": levels.tolist(), "levels": halve_steps(levels).tolist()}
        return ProgressiveTask(cfg, meta, init=ref, teacher=ref, in_memory=data)
    cfg = DistillConfig(method="consistency_distillation", consistency={"num_levels": 18, "sample_levels": [500]},
                        train=train)
    levels = consistency_levels(NoiseSchedule.from_name("linear", 1000), 18)
    meta = {**meta, "method": "consistency_distillation", "native_steps": 1, "consistency_levels": levels.tolist(),
            "sample_levels": [int(levels[len(levels) // 2])]}
    return ConsistencyTask(cfg, meta, init=ref, teacher=ref, in_memory=data)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = args.peak_tflops
    if peak is None and on_gpu and args.precision == "bf16":
        peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in device), None)
    generator = torch.Generator().manual_seed(0)
    rows = args.batch * (args.steps + 1)
    data = (torch.randn(rows, 4, args.latent_size, args.latent_size, generator=generator),
            torch.randint(0, args.num_classes, (rows,), generator=generator))
    methods = ["progressive", "consistency"] if args.method == "both" else [args.method]
    with tempfile.TemporaryDirectory(prefix="latentflow-distill-bench-") as scratch:
        ref, meta, kwargs = teacher(Path(scratch), args)
        flops = dit_flops_per_image(DiT(**kwargs))
        print(f"device={device} torch={torch.__version__} preset={args.preset} latent=4x{args.latent_size}x"
              f"{args.latent_size} batch={args.batch} precision={args.precision} zero={args.zero_stage} "
              f"forward {flops / 1e9:.2f} GFLOP/image")
        for method in methods:
            windows = []

            class Recorder:  # stands in for the step's MLflow tracker
                progress, enabled = None, False  # no console channel, no MLflow previews

                def log_metrics(self, metrics, step):
                    windows.append({**metrics, "step": step})

            task = build_task(method, ref, meta, args, data)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            train_loop(task, task.cfg.train, LocalSession(Path(scratch) / f"ckpt-{method}"), Recorder())
            total = time.perf_counter() - started
            per_image = FORWARDS_PER_IMAGE[method] * flops
            for window in windows:
                achieved = window["images_per_s"] * per_image / 1e12
                line = (f"{method:>12} steps ..{window['step']:>4}: {window['images_per_s']:8.1f} images/s "
                        f"{achieved:7.1f} TFLOP/s  loss {window['loss']:.4f}")
                print(line + (f"  MFU {achieved / peak:6.2%}" if peak else ""))
            memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if on_gpu else ""
            print(f"{method:>12}: whole loop {total:.1f} s ({FORWARDS_PER_IMAGE[method]} F per image){memory}")


if __name__ == "__main__":
    main()
