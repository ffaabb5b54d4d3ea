"""Ablation: one super-resolution stage trained with and without noise conditioning augmentation,
judged on what it meets in a cascade, the base model's samples, not real downsampled images.

Needs a finished workflow with a DiT and autoencoder (``make demo``'s, say). Both stages train here,
in one process (the DiT step's trainer loop, ``LocalSession``), from the same config, seed and data;
they differ only in ``augmentation.noise`` (on: levels up to ``max_level`` while training and
``noise_cond_aug_level`` at sampling; off: level 0 both times). Then, on the same DiT samples (N per class,
the evaluate step's sampler), each stage's 64 px output is scored as the evaluate step scores the
cascade: class accuracy and Fréchet distance under a classifier trained on real images resized to
the output size. PSNR/SSIM on real validation images is printed too, for scale.

    .venv/bin/python benchmarks/sr_augmentation_ablation.py --workflow-id e2e --storage /tmp/latentflow-e2e-XXXX
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.common.train_loop import LocalSession, train_loop  # noqa: E402
from components.superres.config import SuperResConfig  # noqa: E402
from components.superres.load import SuperResMeta  # noqa: E402
from components.superres.task import SuperResTask  # noqa: E402
from components.superres.train import build_step_superres  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow-id", required=True, help="a finished workflow with dit and autoencoder steps")
    parser.add_argument("--storage", required=True, help="its storage root")
    parser.add_argument("--config", default=str(REPO / "configs/pipeline/mnist.yaml"),
                        help="pipeline config whose first superres stage is trained (default: mnist.yaml)")
    parser.add_argument("--per-class", type=int, default=20, help="base samples per class (default 20)")
    parser.add_argument("--sample-levels", default="",
                        help="also score the augmented stage at these sampling aug levels, e.g. 0,0.05 (CDM's sweep)")
    parser.add_argument("--max-level", type=float, default=None,
                        help="training max_level of the augmented stage (default: the config's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of both (default: the config's)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def train_stage(cfg: SuperResConfig, images: torch.Tensor, labels: torch.Tensor, channels: int):
    from components.superres.load import load_superres

    probe = build_step_superres(cfg, channels, 0)
    kwargs = probe.arguments
    meta = SuperResMeta(preset=cfg.preset, model=kwargs, input_size=cfg.input_size, output_size=cfg.output_size,
                        channels=channels, schedule=cfg.schedule, num_timesteps=cfg.num_timesteps, filter=cfg.filter,
                        num_classes=0, classes=None, prediction=cfg.prediction,
                        sampling=cfg.sample.model_dump(mode="json"),
                        augmentation=cfg.augmentation.model_dump(mode="json"),
                        parameters=sum(p.numel() for p in probe.parameters()), max_steps=cfg.train.max_steps)
    task = SuperResTask(cfg, kwargs, meta.to_json(), in_memory=(images, labels))
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        train_loop(task, cfg.train, LocalSession(Path(directory) / "ckpt"), None)
        seconds = time.perf_counter() - started
        export = sorted((Path(directory) / "ckpt").glob("checkpoint_*"))[-1] / "export"
        return load_superres(str(export)), seconds


def with_and_without_augmentation(base_cfg) -> dict:
    """The two stage configs compared: as configured, and with noise conditioning augmentation off (no
    training noise, level 0 at sampling)."""
    return {
        "augmented": base_cfg,
        "no augmentation": base_cfg.model_copy(update={
            "augmentation": base_cfg.augmentation.model_copy(update={
                "noise": base_cfg.augmentation.noise.model_copy(update={"enabled": False})}),
            "sample": base_cfg.sample.model_copy(update={"noise_cond_aug_level": 0.0})}),
    }


def print_table(rows: dict, train_seconds: dict) -> None:
    print(f"{'stage':<22}{'train s':>8}{'acc (base in)':>15}{'FD (base in)':>14}{'PSNR real':>11}"
          f"{'PSNR degraded':>15}{'SSIM real':>11}")
    for name, row in rows.items():
        print(f"{name:<22}{train_seconds[name]:>8.0f}{row['accuracy']:>15.4f}{row['fd']:>14.3f}{row['psnr']:>11.2f}"
              f"{row['psnr_degraded_input']:>15.2f}{row['ssim']:>11.3f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from components.autoencoder.load import load_autoencoder
    from components.dit.generate import generate
    from components.dit.load import load_dit
    from components.evaluate.metrics import frechet_distance_of
    from components.evaluate.judge import classify, read_split, tensor_batches, train_classifier
    from components.superres.sample import SrStage, cascade
    from components.superres.train import evaluate_stage
    from pipelines.config import load_pipeline_config
    from pipelines.sample import find_summary, step_manifest

    pipeline = load_pipeline_config(args.config)
    base_cfg = pipeline.superres[0]
    if args.max_level is not None:
        base_cfg = base_cfg.model_copy(update={"augmentation": base_cfg.augmentation.model_copy(update={
            "noise": base_cfg.augmentation.noise.model_copy(update={"max_level": args.max_level})})})
    if args.steps is not None:
        base_cfg = base_cfg.model_copy(update={"train": base_cfg.train.model_copy(update={"max_steps": args.steps})})
    uri, summary = find_summary(args.workflow_id, args.storage)
    shard = step_manifest(summary, "shard", uri)
    train_x, train_y = read_split(shard, "train")
    val_x, val_y = read_split(shard, "val")
    channels = int(train_x.shape[1])

    variants = with_and_without_augmentation(base_cfg)
    stages, train_seconds = {}, {}
    for name, cfg in variants.items():
        print(f"training the stage, {name} ({cfg.train.max_steps} steps)...", flush=True)
        stages[name], train_seconds[name] = train_stage(cfg, torch.from_numpy(train_x), torch.from_numpy(train_y),
                                                        channels)

    dit, dit_meta = load_dit(step_manifest(summary, "dit", uri))
    ae, ae_meta = load_autoencoder(step_manifest(summary, "autoencoder", uri))
    num_classes = int(dit_meta["num_classes"])
    labels = torch.arange(num_classes).repeat_interleave(args.per_class)
    sampling = pipeline.evaluate.sample if pipeline.evaluate else pipeline.dit.sample
    print(f"sampling {len(labels)} base images with the DiT...", flush=True)
    base = generate(dit, dit_meta, ae, ae_meta, labels, sampling)

    size, filter = base_cfg.output_size, base_cfg.filter
    classifier_cfg = (pipeline.evaluate.cascade_classifier or pipeline.evaluate.classifier) if pipeline.evaluate \
        else None
    real_train, _ = read_split(shard, "train", size, filter)
    real_val, _ = read_split(shard, "val", size, filter)
    classifier, _ = train_classifier(tensor_batches(real_train, train_y, classifier_cfg.batch_size,
                                                    classifier_cfg.seed), num_classes, classifier_cfg)
    val_logits, val_features = classify(classifier, real_val)
    print(f"judge: classifier at {size} px, val accuracy {(val_logits.argmax(1) == val_y).mean():.4f}")
    print(f"augmented: noise levels up to {base_cfg.augmentation.noise.max_level:g} of the schedule while training, "
          f"{base_cfg.sample.noise_cond_aug_level:g} at sampling; {base_cfg.train.max_steps} steps each")

    runs = [(name, stage, variants[name]) for name, stage in stages.items()]
    for level in (float(v) for v in args.sample_levels.split(",") if v.strip()):
        swept = SrStage(stages["augmented"].model, stages["augmented"].meta,
                        stages["augmented"].sampling.model_copy(update={"noise_cond_aug_level": level}))
        runs.append((f"augmented, s={level:g}", swept, variants["augmented"]))
        train_seconds[f"augmented, s={level:g}"] = train_seconds["augmented"]
    rows = {}
    for name, stage, cfg in runs:
        images = cascade(base, [stage], labels, seed=0)
        logits, features = classify(classifier, images)
        quality, _ = evaluate_stage(stage, torch.from_numpy(val_x[:64]), None, cfg)
        rows[name] = {"accuracy": float((logits.argmax(1) == labels.numpy()).mean()),
                      "fd": frechet_distance_of(val_features, features), **quality}
    print_table(rows, train_seconds)
    a, b = rows["augmented"], rows["no augmentation"]
    print(f"on base-model inputs: FD {a['fd']:.3f} (augmented) vs {b['fd']:.3f} (not); accuracy "
          f"{a['accuracy']:.4f} vs {b['accuracy']:.4f}")


if __name__ == "__main__":
    main()
