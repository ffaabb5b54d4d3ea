"""Classifier guidance against classifier-free guidance on a finished workflow (issue 7's target).

Trains the noisy classifier f(y | x_t, t) on the workflow's latents in one process (the
noisy_classifier step's task through the shared loop), prints its validation accuracy by range of
t, then samples the workflow's DiT with classifier guidance alone at each --weights and with
classifier-free guidance at w = 0 and 1, on the same labels and seeds, and judges every set with
the workflow's evaluate classifier (requested-class accuracy, Fréchet distance in its features).

  python benchmarks/classifier_guidance.py --workflow-id ID --storage ./outputs/mnist
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow-id", required=True)
    parser.add_argument("--storage", default=None, help="the pipeline's storage root")
    parser.add_argument("--preset", default="nc-small", help="noisy classifier preset (default nc-small)")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weights", default="0.5,1,2,4,8", help="classifier guidance weights")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from components.autoencoder.load import load_autoencoder
    from components.common.train_loop import LocalSession, train_loop
    from components.dit.config import SamplingConfig
    from components.dit.generate import generate
    from components.dit.load import load_dit
    from components.evaluate.metrics import frechet_distance_of
    from components.evaluate.judge import classify, read_split
    from components.evaluate.load import load_classifier
    from components.latents.load import load_latent_shards
    from components.noisy_classifier.config import NoisyClassifierConfig
    from components.noisy_classifier.load import load_noisy_classifier
    from components.noisy_classifier.model import NOISY_CLASSIFIER_PRESETS
    from components.noisy_classifier.task import NoisyClassifierTask
    from components.noisy_classifier.train import accuracy_by_t
    from pipelines.sample import find_summary, step_manifest

    uri, summary = find_summary(args.workflow_id, args.storage)
    latents, dit_manifest = step_manifest(summary, "latents", uri), step_manifest(summary, "dit", uri)
    dit, dit_meta = load_dit(dit_manifest)
    ae, ae_meta = load_autoencoder(step_manifest(summary, "autoencoder", uri))
    judge, judge_meta = load_classifier(step_manifest(summary, "evaluate", uri))
    classes = latents.info["classes"]
    cfg = NoisyClassifierConfig(preset=args.preset, schedule=dit_meta["schedule"],
                                num_timesteps=int(dit_meta["num_timesteps"]),
                                train=dict(max_steps=args.train_steps, batch_size=args.batch, lr=args.lr,
                                           warmup_steps=50, ema_decay=0.995, log_every=250,
                                           checkpoint_every=10 * args.train_steps))
    meta = {"preset": args.preset, "model": {**NOISY_CLASSIFIER_PRESETS[args.preset],
                                             "in_channels": int(latents.info["latent_shape"][0]),
                                             "num_classes": len(classes)},
            "schedule": cfg.schedule, "num_timesteps": cfg.num_timesteps, "classes": list(classes)}
    with tempfile.TemporaryDirectory(prefix="latentflow-cg-") as scratch:
        started = time.perf_counter()
        train_loop(NoisyClassifierTask(cfg, meta, latents=latents), cfg.train, LocalSession(scratch), None)
        export = sorted(Path(scratch).glob("checkpoint_*"))[-1] / "export"
        noisy = load_noisy_classifier(str(export))
        print(f"noisy classifier {args.preset}: {args.train_steps} steps of {args.batch} in "
              f"{time.perf_counter() - started:.0f} s")
    val_latents, val_labels = (torch.as_tensor(a) for a in load_latent_shards(latents, split="val"))
    task = NoisyClassifierTask(cfg, meta)
    for row in accuracy_by_t(noisy[0], task.schedule, val_latents, val_labels, buckets=4):
        print(f"  validation accuracy, t in [{row['t_low']}, {row['t_high']}]: {row['accuracy']:.3f}")

    val_x, _ = read_split(step_manifest(summary, "shard", uri), "val", judge_meta.image_size)
    _, val_features = classify(judge, val_x)
    labels = torch.arange(len(classes)).repeat_interleave(args.per_class)
    runs = [("classifier-free, w = 0 (conditional only)", 0.0, 0.0),
            ("classifier-free, w = 1", 1.0, 0.0)]
    runs += [(f"classifier guidance, w = {w:g}", 0.0, w) for w in (float(v) for v in args.weights.split(","))]
    print(f"judge: {judge_meta.preset} at {judge_meta.val_accuracy:.4f} on real validation digits; "
          f"{len(labels)} samples per row, DDIM {args.steps} steps, the same labels and seeds")
    print(f"{'sampling':<44} {'accuracy':>9} {'FD':>8} {'seconds':>8}")
    for name, guidance, weight in runs:
        sampling = SamplingConfig(steps=args.steps, guidance=guidance, classifier_guidance=weight)
        started = time.perf_counter()
        images = generate(dit, dit_meta, ae, ae_meta, labels, sampling, classifier=noisy)
        seconds = time.perf_counter() - started
        logits, features = classify(judge, images)
        accuracy = float((logits.argmax(1) == labels.numpy()).mean())
        print(f"{name:<44} {accuracy:>9.3f} {frechet_distance_of(val_features, features):>8.2f} {seconds:>8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
