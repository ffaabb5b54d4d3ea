"""KL vs VQ autoencoder on the mnist preset's settings, in one process (no Ray): validation PSNR of
each and the VQ codebook's usage and perplexity over the validation images.

Both train through the shared train loop (``components.common.train_loop`` with a
``LocalSession``: DeepSpeed, one rank) on the digits and train/val split the shard step makes
(``builtin:mnist`` resized to the preset's size, ``is_val`` on the same keys), with the preset's
``autoencoder`` section; the only difference is ``regularizer``. The preset trains on
``num_workers`` workers of ``batch_size`` each; one process here takes their global batch
(``batch_size x num_workers``) per step, so the step count, the images per step and the VQ's
assignments per step (what ``dead_code_threshold`` is measured in) match the pipeline's.
Evaluation is the step's own: exported EMA weights, ``reconstruction_metrics`` on ``val_samples``
validation images, ``estimate_scale_factor``. Target: VQ within 1 dB of KL, >= half the codebook used.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vq_vs_kl.py --threads 1 \
        [--set autoencoder.vq.codebook_size=256 ...]

Measured here (2 shared CPU cores, 1 thread, about 4 CPU-minutes for both): KL 26.27 dB, VQ 25.58 dB
(gap 0.69 dB), VQ codebook usage 99.8% of 512 codes, perplexity 394. The seconds it prints are
wall time on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.autoencoder.config import AutoencoderConfig  # noqa: E402
from components.autoencoder.load import AE_WEIGHTS  # noqa: E402
from components.autoencoder.model import AUTOENCODER_CLASSES  # noqa: E402
from components.autoencoder.task import AutoencoderTask  # noqa: E402
from components.autoencoder.train import (  # noqa: E402
    build_step_autoencoder,
    estimate_scale_factor,
    reconstruction_metrics,
)
from components.common.config import apply_overrides, read_yaml  # noqa: E402
from components.common.train_loop import LocalSession, train_loop  # noqa: E402


def digits(size: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) uint8 (N, 1, size, size): the shard step's images and split of builtin:mnist."""
    from PIL import Image

    from components.shard.images import prepare
    from components.shard.run import is_val
    from components.shard.sources import mnist_arrays

    pixels, _ = mnist_arrays()
    train, val = [], []
    for row, image in enumerate(pixels):
        array = np.asarray(prepare(Image.fromarray(image, "L"), 1, size))[None]
        (val if is_val(f"mnist-{row:05d}", val_fraction) else train).append(array)
    return np.stack(train), np.stack(val)


def train_and_measure(cfg: AutoencoderConfig, train: np.ndarray, val: np.ndarray, global_batch: int) -> dict:
    info = {"channels": 1, "image_size": train.shape[-1]}
    kwargs = build_step_autoencoder(cfg, info).arguments
    train_cfg = cfg.train.model_copy(update={"batch_size": global_batch, "checkpoint_every": 10**9})
    labels = torch.zeros(len(train), dtype=torch.int64)
    task = AutoencoderTask(cfg, kwargs, None, in_memory=(torch.from_numpy(train), labels))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vq-vs-kl-") as root:
        final = train_loop(task, train_cfg, LocalSession(root), None)
        export = sorted(Path(root).glob("checkpoint_*"))[-1] / "export" / AE_WEIGHTS
        from safetensors.torch import load_file

        model = AUTOENCODER_CLASSES[cfg.regularizer](**kwargs)
        model.load_state_dict(load_file(str(export)))
    train_s = time.perf_counter() - started
    model.eval()
    rng = np.random.default_rng(cfg.train.seed)
    scale = estimate_scale_factor(model, train[rng.permutation(len(train))[:cfg.scale_estimate_samples]],
                                  cfg.train.seed)
    quality, _ = reconstruction_metrics(model, val[:cfg.val_samples])
    return {**quality, "scale_factor": scale, "train_s": train_s, "final_rec_loss": final.get("rec_loss"),
            "vq_batch_usage": final.get("vq_batch_usage")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/pipeline/mnist.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override of the config, e.g. autoencoder.train.max_steps=100")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = apply_overrides(read_yaml(args.config), args.overrides)
    section = data["autoencoder"]
    workers = int(section.get("resources", {}).get("num_workers", 1))
    base = AutoencoderConfig.model_validate(section)
    global_batch = base.train.batch_size * workers
    size = int(base.image_size or data["shard"]["image_size"])
    train, val = digits(size, float(data["shard"].get("val_fraction", 0.1)))
    print(f"{args.config}: {len(train)} train / {len(val)} val digits at {size} px; {base.train.max_steps} steps "
          f"of {global_batch} images ({workers} workers x {base.train.batch_size}), preset {base.preset}")

    results = {}
    for regularizer in ("kl", "vq"):
        cfg = AutoencoderConfig.model_validate({**section, "regularizer": regularizer})
        results[regularizer] = train_and_measure(cfg, train, val, global_batch)
        print(f"  {regularizer}: done in {results[regularizer]['train_s']:.0f} s", flush=True)

    kl, vq = results["kl"], results["vq"]
    rows = [("val PSNR (dB)", "val_psnr", "{:.2f}"), ("val MSE", "val_mse", "{:.5f}"),
            ("scale factor", "scale_factor", "{:.4f}"), ("train seconds", "train_s", "{:.0f}"),
            ("val codebook usage", "val_codebook_usage", "{:.1%}"),
            ("val codebook perplexity", "val_codebook_perplexity", "{:.1f}"),
            ("last-window batch usage", "vq_batch_usage", "{:.1%}")]
    print(f"\n{'':<26}{'KL':>12}{'VQ':>12}")
    for label, key, fmt in rows:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for r in (kl, vq)]
        print(f"{label:<26}{cells[0]:>12}{cells[1]:>12}")
    gap = kl["val_psnr"] - vq["val_psnr"]
    print(f"\nPSNR gap KL - VQ: {gap:.2f} dB (target <= 1); codebook usage {vq['val_codebook_usage']:.1%} of "
          f"{cfg.vq.codebook_size} codes (target >= 50%)")


if __name__ == "__main__":
    main()
