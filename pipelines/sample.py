"""``latentflow sample``: images from a finished workflow's DiT (or its whole cascade: DiT, then
every super-resolution stage), written as PNG files.

The workflow is found through its summary (``<root>/workflows/<id>/summary.json``); the DiT and
autoencoder come from the manifests that summary names, so sampling sees exactly what the
pipeline produced. Sampler settings: the DiT step's own (its ``dit.json`` meta if that carries
``sampling``, else the ``sample`` section of its config), each overridden by a flag given here.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from components.common.images import to_pil
from components.common.step import Manifest, ManifestInvalid, read_manifest_at
from components.common.storage import Storage, StorageError
from components.dit.config import SamplingConfig
from components.dit.load import DitMeta
from pipelines.runtime import summary_path

GRID = "grid.png"
GRID_MAX_COLUMNS = 32
FINISHED = ("ran", "cached")
AUTOENCODER_STEP = "autoencoder"
NOISY_CLASSIFIER_STEP = "noisy_classifier"


class SampleError(ValueError):
    """Sampling cannot start; the message names the workflow, step or file at fault."""


class BadFlag(SampleError):
    """A flag's value is invalid (unknown label, out-of-range sampler setting)."""


# ---------------------------------------------------------------- finding the workflow


# Where a storage root is looked for without --storage: the presets' default roots, ./outputs (a
# config without storage.root) and ./outputs/<name> (configs/pipeline/<name>.yaml, the demo's included).
SEARCH_ROOTS = ("outputs", "outputs/*")


def local_roots(search_base: str | os.PathLike = ".") -> list[str]:
    """The storage roots under ``search_base`` (of ``SEARCH_ROOTS``) that hold workflows."""
    base = Path(search_base)
    found = {Path(p).parent.absolute() for pattern in SEARCH_ROOTS for p in glob.glob(str(base / pattern / "workflows"))}
    return sorted(str(root) for root in found)


def find_summary(workflow_id: str, storage: str | None = None, search_base: str | os.PathLike = ".") -> tuple[str, dict]:
    """(URI of the summary, its content). ``storage``: the pipeline's storage root (local or
    s3://); None searches ``./outputs/workflows/<id>`` and ``./outputs/*/workflows/<id>``."""
    rel = summary_path(workflow_id)
    if storage is not None:
        root = Storage.from_uri(storage)
        try:
            text = root.read_text(rel)
        except StorageError:
            raise SampleError(f"workflow {workflow_id!r} not found: no {root.uri(rel)}") from None
        return root.uri(rel), parse_summary(text, root.uri(rel))
    base = Path(search_base)
    found = [str(Path(root) / rel) for root in local_roots(base) if (Path(root) / rel).is_file()]
    searched = " and ".join(str(base / pattern / rel) for pattern in SEARCH_ROOTS)
    if not found:
        raise SampleError(f"workflow {workflow_id!r} not found: searched {searched}; "
                          f"pass --storage ROOT (the pipeline's storage.root)")
    if len(found) > 1:
        raise SampleError(f"workflow {workflow_id!r} is ambiguous: {len(found)} summaries match {searched}: "
                          f"{', '.join(found)}; pass --storage ROOT to pick one")
    return found[0], parse_summary(Path(found[0]).read_text(), found[0])


def parse_summary(text: str, uri: str) -> dict:
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as e:
        raise SampleError(f"{uri}: not valid JSON: {e}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("steps"), list):
        raise SampleError(f"{uri}: not a workflow summary (no 'steps' list)")
    return summary


def step_manifest(summary: dict, step: str, summary_uri: str) -> Manifest:
    """The manifest of a finished step of the workflow."""
    workflow = summary.get("workflow_id", "?")
    records = {s.get("name"): s for s in summary["steps"]}
    if step not in records:
        raise SampleError(f"workflow {workflow!r} has no step {step!r} (steps: {', '.join(map(str, records))}; "
                          f"summary {summary_uri})")
    record = records[step]
    if record.get("status") not in FINISHED or not record.get("manifest_uri"):
        raise SampleError(f"step {step!r} of workflow {workflow!r} did not finish (status "
                          f"{record.get('status')!r}{': ' + record['error'] if record.get('error') else ''})")
    root_uri = summary_uri.rsplit("/workflows/", 1)[0]  # the root the summary was read from: it may have moved
    uri = f"{root_uri}/{record['manifest_path']}" if record.get("manifest_path") else record["manifest_uri"]
    try:
        return read_manifest_at(uri)
    except StorageError as e:
        raise SampleError(f"manifest of step {step!r} of workflow {workflow!r}: {e}") from None
    except ManifestInvalid as e:
        raise SampleError(f"manifest of step {step!r} ({uri}): {e}") from None


# ---------------------------------------------------------------- flags


def parse_labels(text: str, classes: list[str]) -> list[int]:
    """``"0,3"`` or ``"cat,dog"`` -> class indices. A class name wins over an index when both
    could match (a class named "3" that is not class 3)."""
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for raw in (part.strip() for part in text.split(",") if part.strip()):
        if raw in index:
            labels.append(index[raw])
        elif raw.lstrip("-").isdigit() and 0 <= int(raw) < len(classes):
            labels.append(int(raw))
        else:
            valid = ", ".join(f"{i}={name}" if name != str(i) else name for i, name in enumerate(classes))
            raise BadFlag(f"unknown label {raw!r}: valid labels are indices 0..{len(classes) - 1} or class "
                          f"names ({valid})")
    if not labels:
        raise BadFlag("--labels is empty: give class indices or names, e.g. --labels 0,1,2")
    duplicated = sorted({classes[i] for i in labels if labels.count(i) > 1})
    if duplicated:
        raise BadFlag(f"--labels names class(es) {', '.join(duplicated)} more than once")
    return labels


def sampling_config(defaults: dict[str, Any] | None, **overrides: Any) -> SamplingConfig:
    """The DiT's sampling defaults with every non-None override applied."""
    values = {**(defaults or {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return SamplingConfig(**values)
    except ValidationError as e:
        problems = "; ".join(f"--{flag_name('.'.join(map(str, err['loc'])))}: {err['msg']}" for err in e.errors())
        raise BadFlag(f"invalid sampler settings: {problems}") from None


def flag_name(field: str) -> str:
    """The ``latentflow sample`` flag of a SamplingConfig field: ``corrector_steps`` -> ``corrector-steps``."""
    return field.replace("_", "-")


def dit_sampling_defaults(dit_manifest: Manifest, dit_meta: "DitMeta") -> dict[str, Any] | None:
    return dit_meta.sampling or dit_manifest.config.get("sample")


# ---------------------------------------------------------------- sampling


@dataclass
class SampleResult:
    out: Path
    files: list[Path]  # every PNG, label-major, then grid.png
    labels: list[int]
    classes: list[str]
    sampling: SamplingConfig
    summary_uri: str


def write_images(images, labels: list[int], per_label: int, out: Path) -> list[Path]:
    """``out/<label>/<index>.png`` for uint8 (N, C, H, W) images ordered label-major, and
    ``out/grid.png`` (one row per label, its first ``GRID_MAX_COLUMNS`` images)."""
    from components.common.images import class_grid

    files = []
    for row, label in enumerate(labels):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_label):
            path = folder / f"{index}.png"
            to_pil(images[row * per_label + index].permute(1, 2, 0).cpu().numpy()).save(path, format="PNG")
            files.append(path)
    every_label = [label for label in labels for _ in range(per_label)]
    class_grid(images, every_label, min(per_label, GRID_MAX_COLUMNS)).save(out / GRID, format="PNG")
    return files + [out / GRID]


def superres_stages(summary: dict, summary_uri: str, device: str, prompted: bool = False, **overrides: Any) -> list:
    """The workflow's super-resolution stages (``superres_1``, ``superres_2``, ...), lowest first,
    each with its own sampler settings and every non-None override applied. ``prompted``: the cascade
    of a text DiT's prompts (text stages take them; a class-conditional stage has no class to take)."""
    from components.superres.load import load_superres

    names = sorted((s.get("name") for s in summary["steps"] if str(s.get("name", "")).startswith("superres_")),
                   key=lambda n: int(n.rsplit("_", 1)[1]))
    if not names:
        raise SampleError(f"workflow {summary.get('workflow_id')!r} has no super-resolution steps (superres_1, ...): "
                          f"--step cascade needs a pipeline with a superres section ({summary_uri})")
    try:
        stages = [load_superres(step_manifest(summary, name, summary_uri), device=device, **overrides) for name in names]
    except ValidationError as e:
        problems = "; ".join(f"--sr-{flag_name('.'.join(map(str, err['loc'])))}: {err['msg']}" for err in e.errors())
        raise BadFlag(f"invalid super-resolution sampler settings: {problems}") from None
    texts = [name for name, stage in zip(names, stages) if stage.takes_text]
    classed = [name for name, stage in zip(names, stages) if int(stage.meta.get("num_classes", 0))]
    if texts and not prompted:
        raise BadFlag(f"{', '.join(texts)} of workflow {summary.get('workflow_id')!r} take(s) text: sample the "
                      "cascade from prompts (--prompt/--prompts with --per-prompt and a text DiT), not labels")
    if classed and prompted:
        raise BadFlag(f"{', '.join(classed)} of workflow {summary.get('workflow_id')!r} is class-conditional: "
                      "a prompt names no class; sample that cascade with --labels")
    return stages


def sample(workflow_id: str, labels: str, per_label: int, out: str | os.PathLike, storage: str | None = None,
           step: str = "dit", base: str = "dit", sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
           eta: float | None = None, seed: int | None = None, batch_size: int = 256, device: str = "cpu",
           progress: bool = True, search_base: str | os.PathLike = ".",
           sr_overrides: dict[str, Any] | None = None, sampler_options: dict[str, Any] | None = None) -> SampleResult:
    """Generate ``per_label`` images for each label with the workflow's DiT and write them.
    ``step="distill"``: the distilled student instead, at its native steps (or ``steps`` where it
    supports them). ``step="cascade"``: the ``base`` sampler's images (dit or distill) go on
    through the workflow's super-resolution stages (``sr_overrides``: sampler, steps, guidance,
    noise_cond_aug_level, handoff for every stage); a registered model is sampled by
    ``pipelines.sample_registered`` instead. ``sampler_options``: further SamplingConfig overrides (the score
    samplers' snr, corrector_steps, pc_predictor, langevin_steps, langevin_step_size)."""
    import torch

    from components.autoencoder.load import load_autoencoder
    from components.dit.generate import generate
    from components.dit.load import load_dit

    if per_label < 1:
        raise BadFlag(f"--per-label must be at least 1, got {per_label}")
    sampler_options = sampler_options or {}
    if base not in ("dit", "distill"):
        raise BadFlag(f"--base must be dit or distill, got {base!r}")
    summary_uri, summary = find_summary(workflow_id, storage, search_base)
    stages = None
    if step == "cascade":
        stages = superres_stages(summary, summary_uri, device, **(sr_overrides or {}))
        step = base
    if step == "distill":
        return sample_student(summary, summary_uri, labels, per_label, out, stages, steps=steps, seed=seed,
                              batch_size=batch_size, device=device,
                              unused={"--sampler": sampler, "--guidance": guidance, "--eta": eta,
                                      **{f"--{flag_name(k)}": v for k, v in sampler_options.items()}})
    dit_manifest = step_manifest(summary, step, summary_uri)
    ae_manifest = step_manifest(summary, AUTOENCODER_STEP, summary_uri)
    trained_on = dit_manifest.upstream.get(AUTOENCODER_STEP)
    if trained_on is not None and trained_on != ae_manifest.digest:
        raise SampleError(f"step {step!r} of workflow {summary.get('workflow_id')!r} was trained with another "
                          f"autoencoder than the workflow's {AUTOENCODER_STEP!r} step ({ae_manifest.output_uri})")
    dit, dit_meta = load_dit(dit_manifest, device=device, ema=True)
    if dit_meta.uses_text:
        raise BadFlag(f"the {step} step of workflow {workflow_id!r} is text-conditioned: give --prompt (or --prompts) "
                      "and --per-prompt, not --per-label" + (" (with --labels: class+text, each prompt under each label)"
                                                            if dit_meta.conditioning == "class+text" else ""))
    ae, ae_meta = load_autoencoder(ae_manifest, device=device)
    classes = dit_meta.class_names()
    label_ids = parse_labels(labels, classes)
    sampling = sampling_config(dit_sampling_defaults(dit_manifest, dit_meta), sampler=sampler, steps=steps,
                               guidance=guidance, eta=eta, seed=seed, **sampler_options)
    label_tensor = torch.tensor(label_ids).repeat_interleave(per_label)
    classifier = None
    if sampling.classifier_guidance:
        from components.noisy_classifier.load import load_noisy_classifier

        classifier = load_noisy_classifier(step_manifest(summary, NOISY_CLASSIFIER_STEP, summary_uri), device=device)
    try:
        images = generate(dit, dit_meta, ae, ae_meta, label_tensor, sampling, batch_size=batch_size,
                          progress=progress, classifier=classifier)
    except ValueError as e:  # e.g. a classifier of another forward process
        raise SampleError(str(e)) from None
    images = through_cascade(images, stages, label_tensor, sampling.seed, batch_size)
    return finish(images, label_ids, per_label, out, classes, sampling, summary_uri)


def through_cascade(images, stages: list | None, labels, seed: int, batch_size: int, prompts: list[str] | None = None):
    if stages is None:
        return images
    from components.superres.sample import cascade

    try:
        return cascade(images, stages, labels, seed=seed, batch_size=batch_size, prompts=prompts)
    except ValueError as e:  # a chain that does not fit (sizes, hand-offs)
        raise BadFlag(f"cascade: {e}") from None


def finish(images, label_ids: list[int], per_label: int, out, classes: list[str], sampling: SamplingConfig,
           summary_uri: str) -> SampleResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_images(images, label_ids, per_label, out)
    return SampleResult(out, files, label_ids, classes, sampling, summary_uri)


def sample_student(summary: dict, summary_uri: str, labels: str, per_label: int, out, stages: list | None,
                   steps: int | None, seed: int | None, batch_size: int, device: str,
                   unused: dict[str, Any]) -> SampleResult:
    """``sample`` with the workflow's distilled student (then the cascade when ``stages``)."""
    import torch

    from components.autoencoder.load import load_autoencoder
    from components.distill.load import load_student
    from components.distill.sample import generate_student, supported_steps

    given = [flag for flag, value in unused.items() if value is not None]
    if given:
        raise BadFlag(f"{', '.join(given)} do not apply to a distilled student: it samples deterministically with "
                      "the guidance it was distilled at folded in")
    manifest = step_manifest(summary, "distill", summary_uri)
    ae_manifest = step_manifest(summary, AUTOENCODER_STEP, summary_uri)
    student, meta = load_student(manifest, device=device)
    steps = int(meta.native_steps) if steps is None else steps
    if steps not in supported_steps(meta):
        raise BadFlag(f"--steps {steps}: this {meta.method} student samples with {supported_steps(meta)} steps")
    ae, ae_meta = load_autoencoder(ae_manifest, device=device)
    classes = meta.class_names()
    label_ids = parse_labels(labels, classes)
    seed = 0 if seed is None else seed
    label_tensor = torch.tensor(label_ids).repeat_interleave(per_label)
    images = generate_student(student, meta, ae, ae_meta, label_tensor, steps=steps, seed=seed, batch_size=batch_size)
    images = through_cascade(images, stages, label_tensor, seed, batch_size)
    sampling = SamplingConfig(sampler="ddim", steps=steps, guidance=0.0, eta=0.0, seed=seed)
    return finish(images, label_ids, per_label, out, classes, sampling, summary_uri)
