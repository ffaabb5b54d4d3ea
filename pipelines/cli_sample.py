"""``latentflow sample``: images from a finished workflow's models, or a registered one, as PNG
files (the sampling itself: ``pipelines.sample``)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.markup import escape

from components.common.step import IntegrityError
from components.common.storage import StorageError
from pipelines.cli_shared import console, err


# Options defined apart, one line each in sample()'s signature, so that the command stays short
SNR = typer.Option(
    None, "--snr", help="langevin, pc: signal-to-noise ratio r of the Langevin step size "
                        "2(1-beta_t)(r|z|/|score|)^2. Default: the DiT step's setting (0.16).")
CORRECTOR_STEPS = typer.Option(
    None, "--corrector-steps", help="pc: Langevin corrector steps at each noise level (0: predictor only). "
                                    "Default: the DiT step's setting (1).")
PC_PREDICTOR = typer.Option(
    None, "--pc-predictor", help="pc: ancestral (DDPM's step, right on coarse grids) or reverse_diffusion "
                                 "(the paper's, wants ~100+ steps). Default: the DiT step's setting (ancestral).")
LANGEVIN_STEPS = typer.Option(
    None, "--langevin-steps", help="langevin: Langevin steps per noise level (model calls: steps x this + 1). "
                                   "Default: the DiT step's setting (5).")
LANGEVIN_STEP_SIZE = typer.Option(
    None, "--langevin-step-size", help="langevin: classic step size rule c(1-alphabar_t) with this c, instead "
                                       "of --snr. Default: the DiT step's setting (none: the snr rule).")
CLASSIFIER_GUIDANCE = typer.Option(
    None, "--classifier-guidance", help="Classifier guidance weight w with the workflow's noisy_classifier step "
                                        "(Dhariwal & Nichol): alone with --guidance 0, or on top of "
                                        "classifier-free guidance. Default: the DiT step's setting (0: none).")
FIXED_VARIANCE = typer.Option(
    None, "--fixed-variance", help="ddpm: the reverse variance sigma_t^2 of a DiT that does not learn it, beta_tilde "
                                   "(the posterior's) or beta (Ho et al. 2020). Default: the DiT step's setting.")
INTERPOLATE = typer.Option(
    None, "--interpolate", help="A,B: images along a path between two ends, each a seed (an integer: the image "
                                "--seed A --per-label 1 gives) or an image file (encoded and DDIM-inverted). "
                                "Slerp in x_T, deterministic DDIM; with --frames and one class in --labels. "
                                "Writes OUT/frame_<k>.png and OUT/strip.png.")
FRAMES = typer.Option(None, "--frames", help="--interpolate: frames K (at least 2), both ends included.")
SR_SAMPLER = typer.Option(None, "--sr-sampler", help="cascade: ddim or ddpm for every SR stage. "
                                                       "Default: each stage's setting.")
SR_STEPS = typer.Option(None, "--sr-steps", help="cascade: denoising steps of every SR stage.")
SR_GUIDANCE = typer.Option(None, "--sr-guidance", help="cascade: guidance of class-conditional and text SR stages.")
SR_NOISE_COND_AUG_LEVEL = typer.Option(
    None, "--sr-noise-cond-aug-level", help="cascade: noise-conditioning augmentation level in [0, 1] (fraction "
                                            "of the stage's schedule) at every hand-off.")
SR_HANDOFF = typer.Option(
    None, "--sr-handoff", help="cascade: non_truncated (finish the stage below, then noise its output) or "
                               "truncated (stop the stage below at the level; SR-to-SR hand-offs only).")
CONTROL = typer.Option(None, "--control", help="A control image, or a folder of them: the workflow's ControlNet "
                                               "samples every --labels label under each.")
CONTROL_SCALE = typer.Option(None, "--control-scale", help="--control: the residuals' weight.")


def sample(
    workflow_id: Optional[str] = typer.Option(None, "--workflow-id", help="The workflow whose DiT samples (see `latentflow run`)."),
    model: Optional[str] = typer.Option(None, "--model", help="Instead of --workflow-id: a registered DiT or "
                                        "distilled student, models:/NAME@champion or models:/NAME/VERSION."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="--model: the registry's MLflow URI. "
                                               "Default: MLFLOW_TRACKING_URI."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated class indices or names, e.g. 0,1,2."),
    per_label: Optional[int] = typer.Option(None, "--per-label", min=1, help="Images per label."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="A text DiT's prompt; repeat for more. A "
                                               "class+text DiT draws each under each of --labels."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts", help="A file of prompts: one per line (# "
                                               "comments and blank lines skipped), or a .json list of strings."),
    per_prompt: Optional[int] = typer.Option(None, "--per-prompt", min=1, help="Images per prompt."),
    out: str = typer.Option(..., "--out", help="Output folder: OUT/<label or prompt index>/<index>.png, OUT/grid.png "
                            "(a row each) and, with prompts, OUT/prompts.json."),
    storage: Optional[str] = typer.Option(None, "--storage", help="The pipeline's storage root (local path or s3://). "
                                          "Default: search ./outputs/workflows/ID and ./outputs/*/workflows/ID."),
    step: str = typer.Option(
        "dit", "--step", help="dit: the DiT's images; distill: the distilled student's, with its native steps "
                              "(guidance is folded into it); cascade: the base images through every "
                              "super-resolution stage of the workflow (written at the final resolution)."),
    base: str = typer.Option("dit", "--base", help="cascade: the base sampler, dit or distill (the student)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddim, ddpm, langevin (annealed Langevin dynamics) "
                                          "or pc (predictor-corrector). Default: the DiT step's setting."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps. Default: the DiT step's setting "
                                                              "(distill: the student's native steps)."),
    guidance: Optional[float] = typer.Option(
        None, "--guidance", help="Classifier-free guidance weight w (0: none). Default: the DiT step's setting."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta in [0, 1] (0: deterministic). Default: the DiT step's setting."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Noise seed; the same seed gives the same images. Default: the DiT step's setting."),
    snr: Optional[float] = SNR,
    corrector_steps: Optional[int] = CORRECTOR_STEPS,
    pc_predictor: Optional[str] = PC_PREDICTOR,
    langevin_steps: Optional[int] = LANGEVIN_STEPS,
    langevin_step_size: Optional[float] = LANGEVIN_STEP_SIZE,
    classifier_guidance: Optional[float] = CLASSIFIER_GUIDANCE,
    fixed_variance: Optional[str] = FIXED_VARIANCE,
    interpolate: Optional[str] = INTERPOLATE,
    frames: Optional[int] = FRAMES,
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass (does not change the images)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    sr_sampler: Optional[str] = SR_SAMPLER,
    sr_steps: Optional[int] = SR_STEPS,
    sr_guidance: Optional[float] = SR_GUIDANCE,
    sr_noise_cond_aug_level: Optional[float] = SR_NOISE_COND_AUG_LEVEL,
    sr_handoff: Optional[str] = SR_HANDOFF,
    control: Optional[str] = CONTROL,
    control_scale: Optional[float] = CONTROL_SCALE,
):
    """Images of a finished workflow's DiT (its SR stages with --step cascade, its ControlNet with --control)."""
    if interpolate is not None or frames is not None:
        return interpolate_or_exit(workflow_id, interpolate, frames, labels, out, model, per_label, bool(prompt or prompts_file),
                                   step, storage=storage, steps=steps, guidance=guidance, sampler=sampler, eta=eta, device=device)
    check_sample_flags(workflow_id, model, labels, per_label, bool(prompt or prompts_file), per_prompt, step)
    score_options = dict(snr=snr, corrector_steps=corrector_steps, pc_predictor=pc_predictor, langevin_steps=langevin_steps,
                         langevin_step_size=langevin_step_size, classifier_guidance=classifier_guidance,
                         fixed_variance=fixed_variance)
    common = dict(storage=storage, sampler=sampler, steps=steps, guidance=guidance, eta=eta, seed=seed, batch_size=batch_size,
                  device=device, sampler_options={k: v for k, v in score_options.items() if v is not None})
    if control is not None or control_scale is not None:
        return show_controlled(controlled_or_exit(workflow_id, model, step, control, control_scale, labels, per_label, out, **common))
    sr_overrides = {"sampler": sr_sampler, "steps": sr_steps, "guidance": sr_guidance,
                    "noise_cond_aug_level": sr_noise_cond_aug_level, "handoff": sr_handoff}
    if prompt or prompts_file:
        return show_prompted(workflow_id or model, prompts_or_exit(workflow_id, prompt, prompts_file, per_prompt, out,
                                                                   model=model, tracking_uri=tracking_uri, step=step,
                                                                   base=base, sr_overrides=sr_overrides, labels=labels,
                                                                   **common))
    result = sample_or_exit(workflow_id, labels, per_label, out, step=step, base=base, sr_overrides=sr_overrides,
                            model=model, tracking_uri=tracking_uri, **common)
    print_sampled(workflow_id or model, result)


def check_sample_flags(workflow_id, model, labels, per_label, prompted: bool, per_prompt, step) -> None:
    """One source (--workflow-id or --model); labels with --per-label, or prompts with --per-prompt on the
    workflow's DiT (and --labels, for a class+text DiT: each prompt under each label). Each conflict exits 2,
    named."""
    if (workflow_id is None) == (model is None):
        problem = "give --workflow-id or --model (one of them)"
    elif not prompted:
        problem = None if labels and per_label else "give --labels and --per-label (or --prompt and --per-prompt)"
    else:  # --labels with prompts: a class+text DiT draws each prompt under each label, --per-prompt images each
        problem = ("--prompt/--prompts go with --per-prompt, not --per-label (with --labels too, for a class+text "
                   "DiT: --per-prompt images of each prompt under each label)" if per_label else
                   "give --per-prompt with --prompt/--prompts" if per_prompt is None else
                   f"--step {step}: prompts sample the text DiT (--step dit), its student (--step distill) or "
                   "the cascade on top of either (--step cascade)" if step not in ("dit", "distill", "cascade") else None)
    if problem:
        err.print(f"[bold red]error:[/] {escape(problem)}")
        raise typer.Exit(2)


def prompts_or_exit(*args, **kwargs):
    """``pipelines.sample_prompts.sample_prompts``'s result, its errors as ``sample_or_exit``'s."""
    from pipelines.sample_prompts import sample_prompts

    return run_or_exit(sample_prompts, *args, **kwargs)


def controlled_or_exit(workflow_id, model, step: str, control, control_scale, labels, per_label, out, **common):
    """``pipelines.sample_control.sample_controlled``'s result; --control with a flag it does not take exits 2."""
    from pipelines.sample_control import sample_controlled

    problem = ("--control-scale goes with --control" if control is None else
               "--control samples a workflow's controlnet step: give --workflow-id, not --model" if model else
               f"--control samples the controlnet step over the DiT, not --step {step}" if step != "dit" else None)
    if problem:
        err.print(f"[bold red]error:[/] {escape(problem)}")
        raise typer.Exit(2)
    return run_or_exit(sample_controlled, workflow_id, labels, per_label, control, control_scale, out, **common)


def show_controlled(result) -> None:
    facts = json.loads((result.out / "controls.json").read_text())
    s = result.sampling
    console.print(escape(f"{facts['workflow_id']}: {len(result.files) - 2} images under {len(facts['controls'])} "
                         f"{facts['control']} control(s), scale {facts['control_scale']:g} ({s.sampler}, {s.steps} "
                         f"steps, guidance {s.guidance:g}, seed {s.seed})"), soft_wrap=True)
    console.print(escape(f"wrote {result.out}/<control index>/<label>_<i>.png, {result.out / 'grid.png'} and "
                         f"{result.out / 'controls.json'}"), soft_wrap=True)


def show_prompted(source: str, result) -> None:
    s = result.sampling
    console.print(escape(f"{source}: {len(result.files) - 2} images of {len(result.classes)} prompt(s) "
                         f"({s.sampler}, {s.steps} steps, guidance {s.guidance:g}, eta {s.eta:g}, seed {s.seed})"),
                  soft_wrap=True)
    console.print(escape(f"wrote {result.out}/<prompt index>/<index>.png, {result.out / 'grid.png'} and "
                         f"{result.out / 'prompts.json'}"), soft_wrap=True)


def sample_or_exit(workflow_id, labels, per_label, out, model=None, tracking_uri=None, **kwargs):
    """``pipelines.sample.sample``'s result (``pipelines.sample_registered``'s with ``model``); a bad flag
    exits 2, a workflow or model that cannot be sampled exits 1, each with its message."""
    if model is not None:
        from pipelines.sample_registered import sample_registered

        shared = {k: kwargs[k] for k in ("steps", "sampler", "guidance", "eta", "seed", "batch_size", "device",
                                         "sampler_options")}
        return run_or_exit(sample_registered, model, tracking_uri, labels, per_label, out, **shared)
    from pipelines.sample import sample as sample_images

    return run_or_exit(sample_images, workflow_id, labels, per_label, out, **kwargs)


def run_or_exit(sampling, *args, **kwargs):
    from pipelines.sample import BadFlag, SampleError

    try:
        return sampling(*args, **kwargs)
    except BadFlag as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2)
    except (SampleError, StorageError, IntegrityError) as e:  # IntegrityError: a file changed after it was written
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1)


def print_sampled(source: str, result) -> None:
    """One line naming what was sampled and with which settings, one naming where it went."""
    s = result.sampling
    names = ", ".join(result.classes[i] for i in result.labels)
    langevin_rule = f"step size {s.langevin_step_size:g}" if s.langevin_step_size else f"snr {s.snr:g}"
    score_settings = {"pc": f", {s.pc_predictor} predictor, {s.corrector_steps} corrector steps, snr {s.snr:g}",
                      "langevin": f", {s.langevin_steps} steps per level, {langevin_rule}"}.get(s.sampler, "")
    if s.classifier_guidance:
        score_settings += f", classifier guidance {s.classifier_guidance:g}"
    console.print(escape(f"{source}: {len(result.files) - 1} images of {names} "
                         f"({s.sampler}, {s.steps} steps, guidance {s.guidance:g}, eta {s.eta:g}, seed {s.seed}"
                         f"{score_settings})"),
                  soft_wrap=True)
    console.print(escape(f"wrote {result.out}/<label>/<index>.png and {result.out / 'grid.png'}"), soft_wrap=True)


def interpolate_or_exit(workflow_id, ends, frames, labels, out, model, per_label, prompted: bool, step: str,
                        **settings) -> None:
    """``--interpolate``: ``pipelines.sample_interpolate``'s frames, their flags checked first (exit 2, named)."""
    from pipelines.sample_interpolate import describe, interpolation_problem, sample_interpolation

    problem = ("--frames goes with --interpolate A,B" if ends is None else
               "give --workflow-id with --interpolate" if workflow_id is None and model is None else
               interpolation_problem(model, labels, per_label, prompted, step, frames))
    if problem:
        err.print(f"[bold red]error:[/] {escape(problem)}")
        raise typer.Exit(2)
    result = run_or_exit(sample_interpolation, workflow_id, ends, frames, labels, out, **settings)
    for line in describe(workflow_id, result):
        console.print(escape(line), soft_wrap=True)
