"""DiT training throughput on pre-extracted latents vs encoding every batch with the autoencoder.

Both modes run the DiT step's own loss (``components.dit.task``: ``LatentDitTask`` reads
``batch["latent"]``, ``DitTask`` with ``data: pixels`` encodes ``batch["image"]`` with the frozen
autoencoder inside the loss), the same DiT, batch, optimizer (AdamW) and threads. A step is
forward + loss + backward + update. The modes alternate over rounds so machine noise hits both
alike; the ratio is the median of per-round ratios (each round times both back to back). On a
shared machine, where other processes' load comes and goes within seconds, the CPU-time ratio
(process CPU seconds per step, set OMP_WAIT_POLICY=PASSIVE so idle threads do not spin) is the
steadier figure; on a quiet one the two agree.

Both read from memory, as the step does at MNIST scale (``PixelDitTask`` holds the decoded uint8
shard images, ``LatentDitTask`` the latents): what differs is the encoder forward per batch.
The autoencoder is the ``ae-mnist`` preset with fresh weights (the cost of a trained one is the
same) unless ``--autoencoder`` names an autoencoder step's output (directory or manifest JSON).

    python benchmarks/latents_vs_pixels.py                      # CPU, 2 threads, MNIST sizes
    python benchmarks/latents_vs_pixels.py --batch 64 --autoencoder outputs/mnist/steps/autoencoder/<key>
    python benchmarks/latents_vs_pixels.py --ae-preset ae-f8c4 --channels 3 --image-size 64  # LDM's f8 encoder
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.dit.config import DitConfig  # noqa: E402
from components.dit.task import LatentDitTask, PixelDitTask  # noqa: E402
from components.dit.train import build_step_dit  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-Tiny/2", help="DiT preset (default DiT-Tiny/2)")
    parser.add_argument("--model", default='{"hidden_size": 128, "num_heads": 4}',
                        help="JSON overrides of the preset, as dit.model (default: the MNIST recipe's)")
    parser.add_argument("--ae-preset", default="ae-mnist", help="autoencoder preset (default ae-mnist)")
    parser.add_argument("--autoencoder", default=None,
                        help="a trained autoencoder: its step's output directory or manifest JSON (optional)")
    parser.add_argument("--image-size", type=int, default=32, help="image height = width (default 32)")
    parser.add_argument("--channels", type=int, default=1, help="image channels (default 1)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (default 3)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode per round (default 2)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_ae(args):
    if args.autoencoder:
        from components.autoencoder.load import load_autoencoder
        from components.common.step import MANIFEST_NAME, Manifest

        path = Path(args.autoencoder)
        path = path if path.suffix == ".json" else path / MANIFEST_NAME
        return load_autoencoder(Manifest.from_json(path.read_text()))
    from components.autoencoder.load import AutoencoderMeta
    from components.autoencoder.model import build_autoencoder

    model = build_autoencoder(args.ae_preset, in_channels=args.channels).eval()
    f = model.downsample_factor
    size = args.image_size // f
    meta = AutoencoderMeta(preset=args.ae_preset, model=model.arguments, downsample_factor=f,
                           latent_channels=model.latent_channels, latent_shape=[model.latent_channels, size, size],
                           image_size=args.image_size, channels=args.channels, image_format="png", scale_factor=1.0,
                           scale_from="sample", classes=None)
    return model, meta


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ae, ae_meta = load_ae(args)
    cfg = DitConfig(preset=args.preset, model=json.loads(args.model), train={"batch_size": args.batch, "lr": 1e-4})
    kwargs = build_step_dit(cfg, ae_meta["latent_shape"], args.num_classes).arguments

    n = 4 * args.batch  # a small pool of images, cycled
    images = torch.randint(0, 256, (n, args.channels, args.image_size, args.image_size), dtype=torch.uint8)
    labels = torch.randint(0, args.num_classes, (n,))
    pixels = PixelDitTask(cfg, kwargs, {})
    pixels.set_autoencoder(ae, ae_meta)
    with torch.no_grad():  # the latents step, done once ahead of training (not timed)
        latents = torch.cat([pixels.clean_latents({"image": images[i:i + 256]}) for i in range(0, n, 256)])
    latent = LatentDitTask(cfg, kwargs, {})

    modes = {}
    for name, task, key, source in (("latents", latent, "latent", latents), ("pixels", pixels, "image", images)):
        model = task.build_model().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        counter = {"i": 0}

        def step(task=task, key=key, source=source, model=model, optimizer=optimizer, counter=counter):
            start = (counter["i"] * args.batch) % n
            counter["i"] += 1
            rows = source[start:start + args.batch]
            if rows.dtype == torch.uint8:  # as PixelDitTask.batches gives them
                rows = rows.float().div(127.5).sub(1.0)
            batch = {key: rows, "label": labels[start:start + args.batch]}
            generator = torch.Generator().manual_seed(counter["i"])
            loss, _ = task.loss(model, batch, counter["i"], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        modes[name] = step

    wall = {name: [] for name in modes}
    cpu = {name: [] for name in modes}
    for round_index in range(args.rounds):
        order = list(modes.items()) if round_index % 2 == 0 else list(reversed(modes.items()))
        for name, step in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    images = args.batch * args.steps
    print(f"dit={args.preset} {args.model} ae={args.autoencoder or args.ae_preset} image={args.channels}x"
          f"{args.image_size}x{args.image_size} latent={'x'.join(map(str, ae_meta['latent_shape']))} "
          f"batch={args.batch} threads={args.threads} rounds={args.rounds}x{args.steps} steps")
    print(f"{'mode':<8} {'img/s median':>13} {'min':>8} {'max':>8} {'img/CPU-s':>10}")
    for name in modes:
        rates = [images / t for t in wall[name]]
        print(f"{name:<8} {statistics.median(rates):>13.1f} {min(rates):>8.1f} {max(rates):>8.1f} "
              f"{images / statistics.median(cpu[name]):>10.1f}")
    ratio = statistics.median(p / q for p, q in zip(wall["pixels"], wall["latents"]))
    cpu_ratio = statistics.median(p / q for p, q in zip(cpu["pixels"], cpu["latents"]))
    print(f"ratio latents/pixels: {ratio:.2f}x wall (median of per-round ratios), {cpu_ratio:.2f}x CPU time; "
          "target >= 1.5x")


if __name__ == "__main__":
    main()
