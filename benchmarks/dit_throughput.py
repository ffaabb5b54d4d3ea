"""Training throughput of latentflow's DiT vs diffusers' DiTTransformer2DModel at the same size.

Each step is forward + eps-MSE loss + backward + AdamW on random latents, random timesteps and labels.
The two models alternate over several rounds so that machine noise hits both alike; the table reports
the median of the per-round images/s, and the ratio is the median of the per-round ratios (each round
times both models back to back, so a burst of load from other processes cancels out). Training FLOPs
are taken as 3x the forward matmul FLOPs (dit_flops_per_image). MFU is printed when a peak is known:
--peak-tflops, or on CUDA with --dtype bf16 the dense bf16 peak looked up from the device name.

  python benchmarks/dit_throughput.py      # CPU, the defaults below (DiT-Tiny/2 size on 8x8x4 latents)
  python benchmarks/dit_throughput.py --device cuda --dtype bf16 --batch 256 --depth 28 --hidden 1152 --heads 16 --latent-size 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.dit.model import DiT, dit_flops_per_image  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) by substring of the CUDA device name.
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6, help="transformer blocks (default 6)")
    parser.add_argument("--hidden", type=int, default=192, help="hidden size (default 192)")
    parser.add_argument("--heads", type=int, default=3, help="attention heads (default 3)")
    parser.add_argument("--patch", type=int, default=2, help="patch size (default 2)")
    parser.add_argument("--latent-size", type=int, default=8, help="latent height = width (default 8)")
    parser.add_argument("--latent-channels", type=int, default=4, help="latent channels (default 4)")
    parser.add_argument("--num-classes", type=int, default=1000, help="class count (default 1000)")
    parser.add_argument("--learn-sigma", action="store_true", help="double the output channels on both models")
    parser.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per model before timing (default 5)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round (default 5)")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default 12)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 uses autocast (default fp32)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU; default with CUDA + bf16 by device name (H100/H200 989, A100 312)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class DiffusersAdapter(torch.nn.Module):
    """Gives DiTTransformer2DModel the (x, t, y) -> tensor signature of our DiT."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model(x, timestep=t, class_labels=y, return_dict=False)[0]


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    from diffusers import DiTTransformer2DModel

    out_channels = args.latent_channels * (2 if args.learn_sigma else 1)
    ours = DiT(
        input_size=args.latent_size, patch_size=args.patch, in_channels=args.latent_channels,
        hidden_size=args.hidden, depth=args.depth, num_heads=args.heads, num_classes=args.num_classes,
        class_dropout_prob=0.1, learn_sigma=args.learn_sigma,
    )
    theirs = DiTTransformer2DModel(
        num_attention_heads=args.heads, attention_head_dim=args.hidden // args.heads,
        in_channels=args.latent_channels, out_channels=out_channels, num_layers=args.depth,
        sample_size=args.latent_size, patch_size=args.patch, num_embeds_ada_norm=args.num_classes,
        norm_type="ada_norm_zero",
    )
    return {"latentflow": ours, "diffusers": DiffusersAdapter(theirs)}


def make_step(model, optimizer, args, device, autocast_dtype):
    c = args.latent_channels

    def step():
        x = torch.randn(args.batch, c, args.latent_size, args.latent_size, device=device)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        y = torch.randint(0, args.num_classes, (args.batch,), device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = model(x, t, y)[:, :c]
            loss = F.mse_loss(pred.float(), x)  # x stands in for the noise target: same cost
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    models = {name: m.to(device).train() for name, m in build_models(args).items()}
    steps = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        steps[name] = make_step(model, opt, args, device, autocast_dtype)
        for _ in range(args.warmup):
            steps[name]()
    sync(device)

    rates = {name: [] for name in models}
    for round_index in range(args.rounds):
        # Alternate which model goes first, so neither always runs right after the other.
        order = list(steps.items()) if round_index % 2 == 0 else list(reversed(steps.items()))
        for name, step in order:
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - start))

    flops_image = dit_flops_per_image(models["latentflow"], args.latent_size)
    train_flops_image = 3 * flops_image
    peak = args.peak_tflops
    if peak is None and device.type == "cuda" and args.dtype == "bf16":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)

    print(f"device={device} dtype={args.dtype} threads={args.threads} batch={args.batch} "
          f"depth={args.depth} hidden={args.hidden} heads={args.heads} patch={args.patch} "
          f"latent={args.latent_size}x{args.latent_size}x{args.latent_channels}")
    print(f"forward FLOPs/image: {flops_image / 1e6:.1f} MFLOP (training ~3x: {train_flops_image / 1e6:.1f} MFLOP)")
    header = f"{'model':<12} {'params':>10} {'img/s median':>13} {'min':>8} {'max':>8} {'GFLOP/s':>9}"
    if peak:
        header += f" {'MFU':>7}"
    print(header)
    medians = {}
    for name, model in models.items():
        r = rates[name]
        medians[name] = statistics.median(r)
        gflops = medians[name] * train_flops_image / 1e9
        params = sum(p.numel() for p in model.parameters())
        line = f"{name:<12} {params / 1e6:>9.2f}M {medians[name]:>13.1f} {min(r):>8.1f} {max(r):>8.1f} {gflops:>9.1f}"
        if peak:
            line += f" {gflops / (peak * 1e3):>7.2%}"
        print(line)
    paired = statistics.median(a / b for a, b in zip(rates["latentflow"], rates["diffusers"]))
    print(f"ratio latentflow/diffusers: {paired:.3f} (median of per-round ratios; "
          f"ratio of medians {medians['latentflow'] / medians['diffusers']:.3f})")


if __name__ == "__main__":
    main()
