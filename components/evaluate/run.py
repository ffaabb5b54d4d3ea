"""Evaluate step: judge the DiT's samples with a small classifier trained here on the real digits.

1. Train ``EvalClassifier`` (``cfg.classifier``) on the shard step's training split, streamed,
   in this step's own process (no Ray Train: it is small), and measure it on the validation split,
   streamed into running feature statistics (``components.evaluate.judge``).
2. Generate ``samples_per_class`` images for every class with ``cfg.sample`` and classify them:
   ``sample_accuracy`` (the requested class won) overall and per class.
3. Fréchet distance between the classifier's penultimate features of the real *validation*
   images (their running mean and covariance) and of the generated ones (``frechet_distance``),
   and, for scale, the same distance for as many real *training* images as were generated (the
   first of a seeded stream: a random subset) (``frechet_distance_real_baseline``).
   Both therefore compare equal counts against the same reference; the baseline is the floor a
   perfect generator would reach (slightly optimistic: the classifier has seen the training images).
4. With a distill step among the inputs: the quality-versus-cost table (teacher at
   ``teacher_steps``, the student at its own steps; ``quality_vs_steps.json`` and ``.png``, see
   ``components.evaluate.distill_table``).
5. With ``inception`` set: FID and KID of the first ``inception.samples_per_class`` samples of
   each class on Inception-v3 pool features, against the ``inception_reference`` step's real
   features (``fid``, ``kid``, ``kid_std``, and that step's ``fid_real_baseline``/``kid_real_baseline``),
   and the same at the cascade's final size (``cascade_fid``, ...). See ``components.evaluate.inception``.
6. With super-resolution stages among the inputs: the first ``cascade_samples_per_class`` samples
   of each class go on through the cascade and are scored the same way at the final size, by a
   classifier trained on the real images resized as the last stage made its targets
   (``cascade_*`` metrics, ``cascade_samples.png``; see ``components.evaluate.cascade``).
7. With a noisy_classifier step among the inputs: classifier guidance at ``guidance_comparison``'s
   weights beside classifier-free guidance (``classifier_w<w>_*``, ``cfg_w<w>_*``,
   ``guidance_comparison.json``; see ``components.evaluate.guidance_table``).
8. With a controlnet step among the inputs: control fidelity (``control_edge_f1`` beside
   ``uncontrolled_edge_f1`` for edges, ``control_digit_accuracy``, ...; ``evaluation.json``'s
   ``control``, ``eval_control.png``; see ``components.evaluate.control_fidelity``).
9. With a DiT that learns Σ (L_hybrid or L_vlb): the variational bound in bits/dim on the first
   ``bpd.samples`` validation latents (``bpd``, ``bpd_prior``, ``bpd_kl``, ``bpd_decoder``; see
   ``components.evaluate.bpd``).
10. With ``guidance_sweep`` set (a class DiT): the samples drawn again at each classifier-free guidance
    weight, with accuracy, Fréchet distance and within-class diversity per weight, and the weight
    chosen (``guidance_w<w>_*``, ``guidance_sweep_best_w``, ``guidance_sweep.json`` and ``.png``; see
    ``components.evaluate.guidance_sweep``).

Outputs: ``classifier.safetensors`` + ``classifier.json`` (reused later: see ``load_classifier``),
``eval_samples.png`` (``grid_per_class`` samples per class, one row per class) and
``evaluation.json`` (metrics, sampler settings, counts), the last two also logged to MLflow.
"""

from __future__ import annotations

import json
import logging
import math

import torch

from components.common.step import Manifest, StepContext, StepOutput
from components.common.tracking import png_bytes
from components.common.images import class_grid
from components.evaluate.bpd import bpd_metrics
from components.evaluate.cascade import CASCADE_GRID, first_per_class, score_cascade, stage_names
from components.evaluate.config import EvaluateConfig
from components.evaluate.judge import EvaluateError, Judge, baseline_distance, fit_judge, metric_name, score_samples
from components.evaluate.load import CLASSIFIER_META, CLASSIFIER_WEIGHTS, ClassifierMeta, save_classifier
from components.evaluate.prompts import PROMPT_GRID, PROMPTS_FILE, grid_prompts, prompt_metrics, prompts_per_class
from components.evaluate.sample import dit_takes_text, generate_samples

CODE_VERSION = "6"
SAMPLES_GRID = "eval_samples.png"
EVALUATION = "evaluation.json"

log = logging.getLogger(__name__)

__all__ = ["CODE_VERSION", "EvaluateError", "run", "CLASSIFIER_META", "CLASSIFIER_WEIGHTS", "EVALUATION",
           "SAMPLES_GRID"]


def run(cfg: EvaluateConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    torch.set_num_threads(max(1, math.ceil(ctx.resources.num_cpus)))
    device = "cuda" if ctx.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    shard = inputs["shard"]
    classes = shard.info.get("classes")
    if not classes:
        raise EvaluateError(f"evaluate needs a labelled dataset, but the shard step's source "
                            f"{shard.info.get('source')!r} has no classes")
    num_classes = len(classes)
    autoencoder = inputs.get("autoencoder")  # its image_size is the base resolution the DiT samples at
    size = int((autoencoder.info.get("image_size") if autoencoder else None) or shard.info["image_size"])

    # 1. the classifier, on the real training images
    judge = fit_judge(shard, size, "bicubic", cfg.classifier, num_classes, device, ctx.tracker.log_metrics)
    log.info("evaluate: classifier val accuracy %.4f after %d steps (%.1fs)", judge.val.accuracy,
             cfg.classifier.steps, judge.train_stats["classifier_train_seconds"])
    meta = ClassifierMeta(preset=cfg.classifier.preset, in_channels=judge.image_shape[0], num_classes=num_classes,
                          classes=list(classes), image_size=size, val_accuracy=judge.val.accuracy,
                          input_range="uint8 / 127.5 - 1", train=cfg.classifier.model_dump(mode="json"))
    files = save_classifier(judge.model, meta, ctx.output)

    # 2.-3. samples for every class, classified, and Fréchet distances against the validation images
    labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    prompts = prompts_per_class(shard, list(classes), cfg.samples_per_class) if dit_takes_text(inputs) else None
    images = generate_samples(inputs, labels, cfg.sample, cfg.batch_size, device, list(classes), prompts).cpu()
    scores = score_samples(judge, images, labels, list(classes))
    baseline, baseline_count = baseline_distance(judge, shard, size, "bicubic", len(images), cfg.classifier.seed)
    metrics = {"classifier_val_accuracy": judge.val.accuracy, "sample_accuracy": scores["sample_accuracy"],
               **{metric_name(name): acc for name, acc in scores["per_class"].items()},
               "frechet_distance": scores["frechet_distance"], "frechet_distance_real_baseline": baseline,
               **judge.train_stats}
    metrics.update(bpd_metrics(cfg.bpd, inputs, size, device))  # a learned-variance DiT's bits/dim
    inception = None
    if cfg.inception_enabled:  # FID/KID on the first inception.samples_per_class of each class
        from components.inception_reference.load import InceptionScorer

        if "inception_reference" not in inputs:
            raise EvaluateError("evaluate.inception is set, but the step has no inception_reference input")
        inception = InceptionScorer(inputs["inception_reference"], cfg.inception, device)
        metrics.update(inception("base", images[first_per_class(labels, num_classes, cfg.inception.samples_per_class)]))
    counts = {"train": judge.train_count, "val": judge.val.count, "generated": len(images),
              "samples_per_class": cfg.samples_per_class, "baseline_train": baseline_count}
    evaluation = {"metrics": metrics, "per_class_accuracy": scores["per_class"], "classes": list(classes),
                  "sampling": cfg.sample.model_dump(mode="json"), "generation_batch_size": cfg.batch_size,
                  "counts": counts, "reference_split": "val", "baseline_split": "train",
                  "classifier": {k: v for k, v in meta.to_json().items() if k != "classes"}}

    files += [SAMPLES_GRID, EVALUATION]
    if prompts is not None:  # a text DiT: adherence to the prompts, and a grid of prompts against samples
        metrics.update(prompt_metrics(shard, images, scores["predicted"], prompts))
        files += prompted_grid(cfg, inputs, ctx, prompts, list(classes), device)
    files += _optional_tables(cfg, inputs, ctx, judge, images, labels, list(classes), device, inception,
                              metrics, evaluation, prompts)
    if cfg.guidance_sweep is not None:
        files += guidance_sweep_files(cfg, inputs, ctx, judge, size, num_classes, device, metrics, evaluation)
    grid = class_grid(images, labels.tolist(), min(cfg.grid_per_class, cfg.samples_per_class))
    ctx.output.write_bytes(SAMPLES_GRID, png_bytes(grid))
    ctx.output.write_text(EVALUATION, json.dumps(evaluation, indent=2, sort_keys=True))
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_image(grid, SAMPLES_GRID)
    ctx.tracker.log_dict(evaluation, EVALUATION)
    log.info("evaluate: sample accuracy %.4f, FD %.3f (real baseline %.3f)%s", metrics["sample_accuracy"],
             metrics["frechet_distance"], metrics["frechet_distance_real_baseline"],
             f"; FID {metrics['fid']:.2f}, KID {metrics['kid']:.4f}" if "fid" in metrics else "")
    return StepOutput(files=files, metrics=metrics,
                      info={"classes": list(classes), "counts": counts, "reference_split": "val",
                            "classifier": CLASSIFIER_WEIGHTS, "classifier_meta": CLASSIFIER_META})


def prompted_grid(cfg: EvaluateConfig, inputs: dict[str, Manifest], ctx: StepContext, prompts: list[str],
                  classes: list[str], device: str) -> list[str]:
    """``eval_prompts.png`` (a row per prompt, ``grid_per_class`` samples of it) and ``eval_prompts.json``
    (the rows' prompts), also in MLflow."""
    pairs = grid_prompts(prompts, len(classes))
    rows = [prompt for prompt, _ in pairs]
    per_row = cfg.grid_per_class
    repeated = [prompt for prompt in rows for _ in range(per_row)]
    labels = torch.tensor([label for _, label in pairs], dtype=torch.long).repeat_interleave(per_row)  # class+text
    images = generate_samples(inputs, labels, cfg.sample, cfg.batch_size, device, classes, repeated).cpu()
    grid = class_grid(images, [row for row in range(len(rows)) for _ in range(per_row)], per_row)
    ctx.output.write_bytes(PROMPT_GRID, png_bytes(grid))
    ctx.output.write_text(PROMPTS_FILE, json.dumps({"rows": rows}, indent=2))
    ctx.tracker.log_image(grid, PROMPT_GRID)
    ctx.tracker.log_dict({"rows": rows}, PROMPTS_FILE)
    return [PROMPT_GRID, PROMPTS_FILE]


def _optional_tables(cfg: EvaluateConfig, inputs: dict[str, Manifest], ctx: StepContext, judge: Judge,
                     images: torch.Tensor, labels: torch.Tensor, classes: list[str], device: str, inception,
                     metrics: dict, evaluation: dict, prompts: list[str] | None = None) -> list[str]:
    """4., 6., 7. and 8. of the module docstring, where their inputs are present; the files they wrote."""
    files, num_classes = [], len(classes)
    if "distill" in inputs:  # 4. quality against network evaluations, teacher and student
        from components.evaluate.distill_table import QUALITY_PLOT, QUALITY_TABLE, quality_plot, quality_table

        rows, table_metrics = quality_table(cfg, inputs, judge.model, judge.val.moments, num_classes, device)
        metrics.update(table_metrics)
        evaluation["quality_vs_steps"] = rows
        plot = quality_plot(rows)
        ctx.output.write_text(QUALITY_TABLE, json.dumps(rows, indent=2))
        ctx.output.write_bytes(QUALITY_PLOT, png_bytes(plot))
        ctx.tracker.log_dict({"rows": rows}, QUALITY_TABLE)
        ctx.tracker.log_image(plot, QUALITY_PLOT)
        files += [QUALITY_TABLE, QUALITY_PLOT]
    if stage_names(inputs):  # 6. the composed cascade, at the final resolution
        score_final = None
        if inception is not None and "cascade" in inception.targets:
            def score_final(final, final_labels):
                chosen = first_per_class(final_labels, num_classes, cfg.inception.samples_per_class)
                return inception("cascade", final[chosen])
        cascade_metrics, cascade_grid, evaluation["cascade"] = score_cascade(
            cfg, inputs, images, labels, classes, device, log_metrics=ctx.tracker.log_metrics,
            score_images=score_final, prompts=prompts)
        metrics.update(cascade_metrics)
        ctx.output.write_bytes(CASCADE_GRID, png_bytes(cascade_grid))
        ctx.tracker.log_image(cascade_grid, CASCADE_GRID)
        files.append(CASCADE_GRID)
    if "noisy_classifier" in inputs:  # 7. classifier guidance beside classifier-free guidance
        from components.evaluate.guidance_table import GUIDANCE_GRID, GUIDANCE_TABLE, guidance_table

        rows, guidance_metrics, guidance_grid = guidance_table(cfg, inputs, judge.model, judge.val.moments,
                                                               num_classes, device)
        metrics.update(guidance_metrics)
        evaluation["guidance_comparison"] = rows
        ctx.output.write_text(GUIDANCE_TABLE, json.dumps(rows, indent=2))
        ctx.output.write_bytes(GUIDANCE_GRID, png_bytes(guidance_grid))
        ctx.tracker.log_dict({"rows": rows}, GUIDANCE_TABLE)
        ctx.tracker.log_image(guidance_grid, GUIDANCE_GRID)
        files += [GUIDANCE_TABLE, GUIDANCE_GRID]
    if "controlnet" in inputs:  # 8. how closely the ControlNet's samples follow their controls
        from components.evaluate.control_fidelity import CONTROL_GRID, control_fidelity

        control_metrics, evaluation["control"], control_grid = control_fidelity(cfg, inputs, judge.model, device)
        metrics.update(control_metrics)
        ctx.output.write_bytes(CONTROL_GRID, png_bytes(control_grid))
        ctx.tracker.log_image(control_grid, CONTROL_GRID)
        files.append(CONTROL_GRID)
    return files


def guidance_sweep_files(cfg: EvaluateConfig, inputs: dict[str, Manifest], ctx: StepContext, judge: Judge, size: int,
                         num_classes: int, device: str, metrics: dict, evaluation: dict) -> list[str]:
    """9. of the module docstring: the sweep's metrics, ``guidance_sweep.json`` and its curves."""
    from components.evaluate.guidance_sweep import GUIDANCE_SWEEP, GUIDANCE_SWEEP_PLOT, guidance_sweep

    if dit_takes_text(inputs):
        raise EvaluateError("evaluate.guidance_sweep samples a class-conditional DiT by label; this DiT takes text")
    rows, sweep_metrics, plot = guidance_sweep(cfg, inputs, judge, num_classes, size, device)
    metrics.update(sweep_metrics)
    evaluation["guidance_sweep"] = {"rows": rows, "best_w": sweep_metrics["guidance_sweep_best_w"],
                                    "min_accuracy": cfg.guidance_sweep.min_accuracy,
                                    "real_within_class_diversity": sweep_metrics["real_within_class_diversity"]}
    ctx.output.write_text(GUIDANCE_SWEEP, json.dumps(evaluation["guidance_sweep"], indent=2))
    ctx.output.write_bytes(GUIDANCE_SWEEP_PLOT, png_bytes(plot))
    ctx.tracker.log_dict(evaluation["guidance_sweep"], GUIDANCE_SWEEP)
    ctx.tracker.log_image(plot, GUIDANCE_SWEEP_PLOT)
    log.info("evaluate: guidance sweep %s: best w %s (accuracy >= %g at the lowest FD)",
             ", ".join(f"w={r['guidance']:g} acc {r['sample_accuracy']:.3f} FD {r['frechet_distance']:.2f}" for r in rows),
             sweep_metrics["guidance_sweep_best_w"], cfg.guidance_sweep.min_accuracy)
    return [GUIDANCE_SWEEP, GUIDANCE_SWEEP_PLOT]
