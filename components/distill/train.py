"""Distill step: turn the trained DiT into a sampler of a handful of steps, or of one.

Inputs: ``dit`` (the teacher: its EMA weights and meta), ``autoencoder`` (decodes the grids) and
``latents`` (the training latents the student is trained on, as the DiT was).

- ``progressive`` (Salimans & Ho 2022): rounds halve the DDIM steps from
  ``progressive.start_steps`` to ``end_steps``. Round k's teacher is round k-1's EMA student (round
  1's is the DiT under classifier-free guidance at ``guidance``: the guidance is folded into the
  student); its student starts as a copy of its teacher. Each round is its own ``fit`` (its own
  checkpoints under ``_checkpoints/round_k``: an interrupted step resumes inside the round it was
  in, finished rounds are kept), its own MLflow child run with a sample grid, and its own
  ``round_k/`` outputs; ``round_k/round.json`` is written last and marks the round done. It records
  the sha256 of the round's files, and a later run keeps the round only if they still match.
- ``consistency_distillation`` / ``consistency_training`` (Song et al. 2023): one ``fit`` of a
  ``ConsistencyTask``; grids at 1 and 2 steps.

Both DDIM grids use "trailing" spacing, the one whose halving gives the next round's grid exactly.
Outputs: ``distill.safetensors`` (EMA student), ``distill_raw.safetensors``, ``distill.json`` (see
``components.distill.sample``), ``samples.png`` (native steps) and the per-round/per-step grids.

A text-conditioned DiT (issue 17) is distilled from its captions: the latents stream with them, the
teacher is guided against its null caption, the student is a ``TextDiT`` (``components.distill.text``),
the joint encoder's ``text_tokenizer.json`` is written beside every student, and the grids have a row
per prompt of the DiT's ``grid_prompts``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from components.common.checkpoint import CheckpointError
from components.common.step import CHECKPOINT_DIR, Manifest, StepContext, StepOutput
from components.common.storage import sha256_file
from components.distill.config import DistillConfig
from components.distill.load import STUDENT_META, STUDENT_WEIGHTS, StudentMeta, load_student
from components.distill.sample import PROGRESSIVE, generate_student, supported_steps
from components.distill.task import ConsistencyTask, DistillTask, ProgressiveTask
from components.distill.text import joint_encoder, teacher_tokenizer, uses_text

CODE_VERSION = "1"
SPACING = "trailing"
ROUND_DONE = "round.json"
STUDENT_FILES = (STUDENT_WEIGHTS, "distill_raw.safetensors", STUDENT_META)
ROUND_FILES = (*STUDENT_FILES, "samples.png")  # what round_k/ holds besides round.json

# The task classes the step trains: "progressive" (one per round) and "consistency" (both consistency
# methods). Looked up when the step builds a task, on the driver: the seam for tests that need a worker
# to fail inside a round (tests/crash_hooks.py stands a subclass in; it reaches the Ray Train workers
# pickled, subclass and all), so no test switch lives in the stage.
TASK_CLASSES: dict[str, type[DistillTask]] = {PROGRESSIVE: ProgressiveTask, "consistency": ConsistencyTask}

if TYPE_CHECKING:
    from components.common.storage import Storage
    from components.dit.load import DitMeta

log = logging.getLogger(__name__)


def base_meta(cfg: DistillConfig, dit_meta: "DitMeta", guidance: float) -> dict:
    """The step's own ``StudentMeta`` fields that every student of the run shares, after checking that
    the teacher can be distilled by ``cfg.method``."""
    if cfg.method != PROGRESSIVE and dit_meta.prediction != "v":
        raise ValueError(f"distill.method {cfg.method} needs a v-prediction DiT (dit.prediction: v): v is EDM's "
                         f"preconditioning at sigma_data = 1, which the consistency function is built on; this "
                         f"DiT predicts {dit_meta.prediction!r}")
    if dit_meta.learn_sigma:
        log.warning("distill: the DiT learns its variance; the student keeps the channels but DDIM ignores them")
    if dit_meta.prediction == "eps":
        log.warning("distill: an eps-prediction teacher; Salimans & Ho use x or v, since eps turns into an "
                    "unstable x-prediction at high noise, which few-step students reach")
    return {"method": cfg.method, "guidance": guidance, "spacing": SPACING, "distill": cfg.model_dump(mode="json")}


def round_student_meta(teacher_meta: "DitMeta", facts: dict, k: int, steps: int, levels: list[int],
                       student_levels: list[int]) -> StudentMeta:
    """``round_k/distill.json``: the student of round k halves its teacher's ``steps`` (grid ``levels``);
    round 1's teacher is the DiT under the step's guidance, later ones are unguided students."""
    return StudentMeta.of_teacher(teacher_meta, **facts, round=k, teacher_steps=steps, native_steps=steps // 2,
                                  teacher_levels=levels, levels=student_levels,
                                  teacher_cfg_weight=facts["guidance"] if k == 1 else 0.0)


def consistency_student_meta(teacher_meta: "DitMeta", facts: dict, distilling: bool, levels: list[int],
                             sample_levels: list[int]) -> StudentMeta:
    """``distill.json`` of a consistency model (distilled, or trained without a teacher)."""
    folded = facts["guidance"] if distilling else 0.0  # no teacher: nothing is folded in
    return StudentMeta.of_teacher(teacher_meta, **{**facts, "guidance": folded}, native_steps=1,
                                  consistency_levels=levels, sample_levels=sample_levels, teacher_cfg_weight=folded)


def student_files(meta: "DitMeta") -> tuple[str, ...]:
    """A student's files: its weights and meta, and a joint text encoder's tokenizer."""
    from components.text.load import TOKENIZER_FILE

    return (*STUDENT_FILES, TOKENIZER_FILE) if joint_encoder(meta) else STUDENT_FILES


def round_files(meta: "DitMeta") -> tuple[str, ...]:
    """What round_k/ holds besides round.json."""
    return (*student_files(meta), "samples.png")


def sample_grid(ctx: StepContext, tracker, source, cfg: DistillConfig, ae, ae_meta, name: str, steps: int | None):
    """A row per class (grid_classes of them), or per prompt of the DiT's grid_prompts for a text teacher."""
    from components.common.tracking import png_bytes
    from components.common.images import class_grid
    from components.dit.task import grid_conditions

    student, meta = load_student(source)
    prompts = meta.grid_prompts if meta.uses_text else None
    labels, prompts, rows = grid_conditions(cfg, int(meta.num_classes), prompts)
    started = time.perf_counter()
    images = generate_student(student, meta, ae, ae_meta, labels, steps=steps, seed=cfg.seed, prompts=prompts)
    grid = class_grid(images, rows, cfg.grid_per_label)
    ctx.output.write_bytes(name, png_bytes(grid))
    tracker.log_image(grid, name.rsplit("/", 1)[-1])
    return time.perf_counter() - started


def progressive_rounds(cfg: DistillConfig, teacher_meta: "DitMeta", facts: dict, inputs: dict[str, Manifest],
                       ctx: StepContext, ae, ae_meta, tokenizer_json: str | None = None) -> tuple[list[str], dict]:
    from components.common.trainer import fit
    from components.diffusion import spaced_timesteps
    from components.distill.targets import halve_steps
    from components.dit.load import DIT_WEIGHTS

    files, metrics = [], {}
    teacher = (inputs["dit"].output_uri, DIT_WEIGHTS)
    levels = spaced_timesteps(int(teacher_meta.num_timesteps), cfg.progressive.start_steps, SPACING)
    for k, steps in enumerate(cfg.progressive.rounds, start=1):
        folder = f"round_{k}"
        student_levels = halve_steps(levels)
        round_meta = round_student_meta(teacher_meta, facts, k, steps, levels.tolist(), student_levels.tolist())
        round_meta = round_meta.to_json()  # the file's form: it travels to the workers
        names = [f"{folder}/{n}" for n in (*round_files(teacher_meta), ROUND_DONE)]
        summary = finished_round(ctx.output, folder, round_files(teacher_meta))
        if summary is not None:
            log.info("distill: round %d (%d -> %d steps) already done", k, steps, steps // 2)
        else:
            child = ctx.tracker.child(f"round {k}: {steps} -> {steps // 2} steps",
                                      tags={"latentflow.round": k, "latentflow.student_steps": steps // 2})
            task = TASK_CLASSES[PROGRESSIVE](cfg, round_meta, init=teacher, teacher=teacher,
                                             latents=inputs["latents"], tokenizer_json=tokenizer_json)
            try:
                result = fit(task, cfg.train, dataclasses.replace(ctx, tracker=child), name=folder)
            except BaseException:
                child.end(failed=True)
                raise
            result.upload_to(ctx.output, prefix=folder)
            seconds = sample_grid(ctx, child, ctx.output.uri(folder), cfg, ae, ae_meta, f"{folder}/samples.png", None)
            summary = {"round": k, "teacher_steps": steps, "student_steps": steps // 2,
                       "loss": float(result.metrics.get("loss", float("nan"))),
                       "images_per_s": float(result.metrics.get("images_per_s", float("nan"))),
                       "grid_sample_seconds": seconds}
            child.log_metrics({"grid_sample_seconds": seconds}, step=cfg.train.max_steps)
            child.log_dict(round_meta, STUDENT_META)
            child.end()
            mark_round_done(ctx.output, folder, summary, round_files(teacher_meta))
        metrics[f"round_{k}_loss"] = summary["loss"]
        files += names
        teacher, levels = (ctx.output.uri(folder), STUDENT_WEIGHTS), student_levels
    for name in student_files(teacher_meta):  # the last round's student is the step's student
        ctx.output.write_bytes(name, ctx.output.read_bytes(f"{folder}/{name}"))
    return files, metrics


def mark_round_done(output: "Storage", folder: str, summary: dict, names: tuple[str, ...] = ROUND_FILES) -> None:
    """Write ``folder/round.json``, last: the round's summary and the sha256 of each of its files
    (``names``). A later run keeps the round only if its files still hash to these (``finished_round``):
    the step's manifest hashes whatever is there at the end, so it would vouch for a changed file."""
    files = {name: _content_sha256(output, f"{folder}/{name}") for name in names}
    output.write_text(f"{folder}/{ROUND_DONE}", json.dumps({**summary, "files": files}, indent=2))


def finished_round(output: "Storage", folder: str, names: tuple[str, ...] = ROUND_FILES) -> dict | None:
    """The summary in ``folder/round.json`` if the round is done (None if not), once every round
    file (``names``) hashes to the sha256 recorded there; refuses, naming the file, if one does not."""
    marker = f"{folder}/{ROUND_DONE}"
    if not output.exists(marker):
        return None
    try:
        summary = json.loads(output.read_text(marker))
        recorded = summary["files"]
    except (ValueError, KeyError, TypeError):
        recorded = None
    start_over = (f"delete {output.uri(folder)} and {output.uri(f'{CHECKPOINT_DIR}/{folder}')} to train "
                  f"round {folder.rsplit('_', 1)[-1]} again")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{output.uri(marker)}: records no sha256 of the round's files (written by older "
                              f"code), so they cannot be checked; {start_over}")
    for name in names:
        rel = f"{folder}/{name}"
        if name not in recorded:
            raise CheckpointError(f"{output.uri(rel)}: not recorded in {marker}; {start_over}")
        if not output.exists(rel):
            raise CheckpointError(f"{output.uri(rel)}: missing, though {marker} marks the round done; {start_over}")
        if _content_sha256(output, rel) != recorded[name]:
            raise CheckpointError(f"{output.uri(rel)}: sha256 differs from the one {marker} recorded when the "
                                  f"round finished: the file changed since; {start_over}")
    return summary


def _content_sha256(output: "Storage", rel: str) -> str:
    """The sha256 of the bytes themselves: ``Storage.sha256`` of an S3 object may be the digest
    recorded in its metadata, which whoever rewrites the object can rewrite too."""
    if output.is_local:
        return output.sha256(rel)
    with tempfile.TemporaryDirectory(prefix="latentflow-round-") as tmp:
        output.download(rel, Path(tmp) / "file")
        return sha256_file(Path(tmp) / "file")


def consistency_run(cfg: DistillConfig, teacher_meta: "DitMeta", facts: dict, inputs: dict[str, Manifest],
                    ctx: StepContext, tokenizer_json: str | None = None) -> tuple[list[str], dict]:
    from components.common.trainer import fit
    from components.diffusion import NoiseSchedule
    from components.distill.consistency import ConsistencyFunction, consistency_levels
    from components.dit.load import DIT_WEIGHTS

    schedule = NoiseSchedule.from_name(teacher_meta.schedule, int(teacher_meta.num_timesteps))
    levels = consistency_levels(schedule, cfg.consistency.num_levels, cfg.consistency.rho)
    fn = ConsistencyFunction(schedule, levels)
    sample_levels = [int(levels[fn.nearest_index(level)]) for level in cfg.consistency.sample_levels]
    distilling = cfg.method == "consistency_distillation"
    # the file's form: it travels to the workers
    full_meta = consistency_student_meta(teacher_meta, facts, distilling, levels.tolist(), sample_levels).to_json()
    dit = (inputs["dit"].output_uri, DIT_WEIGHTS)
    if cfg.consistency.distance == "lpips":
        from components.autoencoder.lpips import check_lpips_file

        check_lpips_file(cfg.consistency.lpips_weights)  # before any worker starts
    task = TASK_CLASSES["consistency"](cfg, full_meta, init=dit if cfg.student_init == "dit" else None,
                                       teacher=dit if distilling else None, latents=inputs["latents"],
                                       autoencoder=inputs["autoencoder"], tokenizer_json=tokenizer_json)
    result = fit(task, cfg.train, ctx, name="consistency")
    files = result.upload_to(ctx.output)
    return files, {"loss": float(result.metrics.get("loss", float("nan"))),
                   "images_per_s": float(result.metrics.get("images_per_s", float("nan")))}


def run(cfg: DistillConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    from components.autoencoder.load import load_autoencoder
    from components.dit.load import load_dit_meta

    if "latents" not in inputs:
        raise ValueError("the distill step trains on the latents step's latents; add the latents section "
                         "(dit.data: latents)")
    dit_meta = load_dit_meta(inputs["dit"])
    check_text_inputs(dit_meta, inputs["latents"])
    if cfg.guidance is None and not dit_meta.sampling:
        raise ValueError(f"{inputs['dit'].uri('dit.json')} records no sampling settings to take the teacher's "
                         "guidance from: set distill.guidance")
    guidance = float(dit_meta.sampling["guidance"] if cfg.guidance is None else cfg.guidance)
    facts = base_meta(cfg, dit_meta, guidance)
    tokenizer_json = teacher_tokenizer(inputs["dit"], dit_meta)
    ae, ae_meta = load_autoencoder(inputs["autoencoder"])
    ctx.tracker.set_tags({"latentflow.distill_method": cfg.method, "latentflow.teacher_guidance": guidance})
    if cfg.method == PROGRESSIVE:
        files, metrics = progressive_rounds(cfg, dit_meta, facts, inputs, ctx, ae, ae_meta, tokenizer_json)
    else:
        files, metrics = consistency_run(cfg, dit_meta, facts, inputs, ctx, tokenizer_json)

    final_meta = StudentMeta.read(ctx.output, STUDENT_META)
    grids = []
    for steps in supported_steps(final_meta):
        name = "samples.png" if steps == final_meta.native_steps else f"samples_{steps}step.png"
        metrics[f"grid_seconds_{steps}step"] = sample_grid(ctx, ctx.tracker, ctx.output, cfg, ae, ae_meta, name, steps)
        grids.append(name)
    metrics["native_steps"] = float(final_meta.native_steps)
    ctx.tracker.log_dict(final_meta.to_json(), STUDENT_META)
    ctx.tracker.log_metrics(metrics)
    log.info("distill: %s student, %d native steps, guidance %.2f folded in", cfg.method,
             final_meta.native_steps, final_meta.guidance)
    info = {"method": cfg.method, "native_steps": final_meta.native_steps, "guidance": final_meta.guidance,
            "supported_steps": supported_steps(final_meta)}
    return StepOutput(files=sorted(set(files + list(student_files(final_meta)) + grids)), metrics=metrics, info=info)


def check_text_inputs(dit_meta: "DitMeta", latents: Manifest) -> None:
    """A text teacher is distilled on the captions its latents carry."""
    from components.common.data import has_captions

    if dit_meta.uses_text and not has_captions(latents):
        raise ValueError("distill: the DiT is text-conditioned, but the latents step's shards carry no captions "
                         "(shard.captions is none): the teacher is distilled on the training captions")
