"""Sampling cost of a cascade, stage by stage: the latent DiT base (guided DDIM, decoded by the
autoencoder) and each super-resolution stage, with fresh weights (the cost of trained ones is the
same). Prints seconds and images/s per stage and the share of each in the whole.

  python benchmarks/cascade_sampling.py                  # CPU: the smoke shapes (16 px base, 16 -> 32)
  python benchmarks/cascade_sampling.py --preset imagenet --device cuda --dtype bf16   # imagenet256.yaml's
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.autoencoder.load import AutoencoderMeta  # noqa: E402
from components.autoencoder.model import build_autoencoder  # noqa: E402
from components.dit.config import SamplingConfig  # noqa: E402
from components.dit.generate import generate  # noqa: E402
from components.dit.load import DitMeta  # noqa: E402
from components.dit.model import build_dit  # noqa: E402
from components.superres.config import SuperResSamplingConfig  # noqa: E402
from components.superres.load import SuperResMeta  # noqa: E402
from components.superres.model import build_superres  # noqa: E402
from components.superres.sample import SrStage, cascade  # noqa: E402

PRESETS = {
    # base: (DiT preset, latent c, latent size, AE preset, image channels, base size, classes), stages
    "smoke": dict(dit="DiT-Micro/2", latent=(4, 4), ae="ae-mnist", channels=1, base=16, classes=10,
                  stages=[("sr-tiny", 16, 32, 4, "non_truncated")], dit_steps=10),
    "imagenet": dict(dit="DiT-XL/2", latent=(4, 32), ae="ae-f2c4", channels=3, base=64, classes=1000,
                     stages=[("sr-256", 64, 128, 50, "non_truncated"), ("sr-256", 128, 256, 25, "truncated")],
                     dit_steps=250),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--dit-steps", type=int, default=None, help="base DDIM steps (default: the preset's)")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    device = torch.device(args.device)
    torch.manual_seed(0)
    c, size = p["latent"]
    dit = build_dit(p["dit"], input_size=size, in_channels=c, num_classes=p["classes"], learn_sigma=False).to(device)
    ae = build_autoencoder(p["ae"]).to(device).eval()
    # untrained models: the metas' training entries are nominal
    dit_meta = DitMeta(preset=p["dit"], model=dit.arguments, num_classes=p["classes"], latent_shape=[c, size, size],
                       schedule="linear", num_timesteps=1000, null_label=p["classes"], prediction="eps",
                       learn_sigma=False, classes=None, image_channels=p["channels"], image_size=p["base"],
                       flops_per_image=0.0, parameters=0, data="latents", max_steps=0, ema_decay=0.0)
    ae_meta = AutoencoderMeta(preset=p["ae"], model=ae.arguments, downsample_factor=ae.downsample_factor,
                              latent_channels=c, latent_shape=[c, size, size], image_size=p["base"],
                              channels=p["channels"], image_format="png", scale_factor=1.0, scale_from="sample",
                              classes=None)
    stages = []
    for preset, low, high, steps, handoff in p["stages"]:
        model = build_superres(preset, in_channels=p["channels"], out_size=high).to(device).eval()
        meta = SuperResMeta(preset=preset, model=model.arguments, input_size=low, output_size=high,
                            channels=p["channels"], schedule="cosine", num_timesteps=1000, filter="bicubic",
                            num_classes=0, classes=None, prediction="v", sampling={}, augmentation={}, parameters=0,
                            max_steps=0)
        stages.append(SrStage(model, meta, SuperResSamplingConfig(steps=steps, handoff=handoff)))
    labels = torch.arange(args.images) % p["classes"]
    sampling = SamplingConfig(steps=args.dit_steps or p["dit_steps"], guidance=4.0)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        timed(lambda: generate(dit, dit_meta, ae, ae_meta, labels[:2], sampling.model_copy(update={"steps": 2})))
        base, base_s = timed(lambda: generate(dit, dit_meta, ae, ae_meta, labels, sampling, batch_size=args.images))
        rows = [(f"base {p['dit']} {p['base']} px, {sampling.steps} steps, guided", base_s)]
        images = base
        for k, stage in enumerate(stages, start=1):
            chain = stages[:k]
            out, seconds = timed(lambda: cascade(base, chain, labels, seed=0, batch_size=args.images))
            previous = sum(s for _, s in rows[1:])
            rows.append((f"+ SR {stage.meta['input_size']}->{stage.meta['output_size']}, {stage.sampling.steps} "
                         f"steps, {stage.sampling.handoff}", seconds - previous))
            images = out
    total = sum(s for _, s in rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} dtype={args.dtype} images={args.images} final={tuple(images.shape[1:])}")
    for label, seconds in rows:
        print(f"{label:<52}{seconds:>8.2f} s {args.images / max(seconds, 1e-9):>9.2f} img/s {seconds / total:>7.1%}")
    print(f"{'whole cascade':<52}{total:>8.2f} s {args.images / total:>9.2f} img/s")


if __name__ == "__main__":
    main()
