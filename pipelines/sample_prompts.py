"""``latentflow sample --prompt "…" [--prompt "…"]… --per-prompt N`` (or ``--prompts FILE``): images of
a finished workflow's text-conditioned DiT (``--step distill``: its distilled student; or, with
``--model models:/NAME@ALIAS``, a registered one), written as ``OUT/<prompt index>/<i>.png``,
``OUT/grid.png`` (one row per prompt) and ``OUT/prompts.json``. ``--step cascade`` takes the text DiT's
(or, with ``--base distill``, its student's) images on through the workflow's super-resolution stages,
each text stage given the image's prompt.

Image i of prompt k uses noise stream k * N + i of the seed, as labels do: the same seed and prompts
give the same images whatever the batch size. Every sampler, guidance (against the empty caption) and
thresholding work as with classes.

A class+text DiT takes ``--labels`` too, and draws each prompt under each label: row r = (label a,
prompt k) with r = a * len(prompts) + k, label-major, ``--per-prompt`` images each (guidance against the
null label with the empty caption). A text-only DiT refuses ``--labels``, a class+text one needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.dit.config import SamplingConfig
from components.dit.generate import generate

from pipelines.prompts import PromptError, gather_prompts, write_prompts_json
from pipelines.sample import (AUTOENCODER_STEP, BadFlag, SampleError, SampleResult, dit_sampling_defaults,
                              find_summary, parse_labels, sampling_config, step_manifest, write_images)

if TYPE_CHECKING:
    from components.autoencoder.load import AutoencoderMeta
    from components.dit.load import DitMeta


@dataclass
class TextModel:
    kind: str  # "dit" or "distill"
    network: Any  # the TextDiT (a student is one too)
    meta: "DitMeta"  # a StudentMeta for a distilled student
    ae: Any
    ae_meta: "AutoencoderMeta"
    defaults: dict | None  # a DiT's sampling settings


def sample_prompts(workflow_id: str | None, prompts: list[str] | None, prompts_file: str | None, per_prompt: int,
                   out: str | os.PathLike, storage: str | None = None, sampler: str | None = None,
                   steps: int | None = None, guidance: float | None = None, eta: float | None = None,
                   seed: int | None = None, batch_size: int = 256, device: str = "cpu", progress: bool = True,
                   search_base: str | os.PathLike = ".", sampler_options: dict[str, Any] | None = None,
                   model: str | None = None, tracking_uri: str | None = None, step: str = "dit", base: str = "dit",
                   sr_overrides: dict[str, Any] | None = None, labels: str | None = None) -> SampleResult:
    """Generate ``per_prompt`` images for each prompt with the workflow's text DiT (``step="distill"``: its
    distilled student, at its native steps; ``step="cascade"``: the ``base`` one's, then the workflow's
    super-resolution stages with ``sr_overrides``) or the registered ``model``'s (``models:/NAME@ALIAS``),
    and write them; a class+text DiT's for each prompt under each of ``labels`` (--labels)."""
    if per_prompt < 1:
        raise BadFlag(f"--per-prompt must be at least 1, got {per_prompt}")
    stages = None
    if step == "cascade":
        stages, step = prompted_stages(workflow_id, model, base, storage, search_base, device, sr_overrides)
    try:
        prompts = gather_prompts(prompts, prompts_file)
    except PromptError as e:
        raise BadFlag(str(e)) from None
    if model is not None:
        source, text_model = model, registered_text_model(model, tracking_uri, device)
    else:
        source, text_model = workflow_text_model(workflow_id, step, storage, search_base, device)
    label_ids, classes, row_prompts = labelled_rows(text_model.meta, labels, prompts)
    every = [prompt for prompt in row_prompts for _ in range(per_prompt)]
    label_tensor = None if label_ids is None else torch.tensor(label_ids).repeat_interleave(per_prompt)
    if text_model.kind == "distill":
        unused = {"--sampler": sampler, "--guidance": guidance, "--eta": eta, **(sampler_options or {})}
        if any(value is not None for value in unused.values()):
            raise BadFlag(f"{', '.join(k for k, v in unused.items() if v is not None)}: a distilled student samples "
                          "with its own sampler, its teacher's guidance folded in")
        sampling, draw = student_drawing(text_model, every, steps, seed, batch_size, label_tensor)
    else:
        sampling = sampling_config(text_model.defaults, sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                                   seed=seed, **(sampler_options or {}))
        draw = partial(generate, text_model.network, text_model.meta, text_model.ae, text_model.ae_meta,
                       label_tensor, sampling, batch_size=batch_size, progress=progress, prompts=every)
    try:
        images = draw()
    except ValueError as e:
        raise SampleError(str(e)) from None
    if stages is not None:
        from pipelines.sample import through_cascade

        # a text DiT's rows have no class (the stages take the prompts); a class+text one's, their labels
        cascade_labels = torch.zeros(len(every), dtype=torch.long) if label_tensor is None else label_tensor
        images = through_cascade(images, stages, cascade_labels, sampling.seed, batch_size, prompts=every)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_images(images, list(range(len(row_prompts))), per_prompt, out)
    origin = {"model": model} if model is not None else {"workflow_id": workflow_id, "step": text_model.kind}
    if stages is not None:
        origin.update(step="cascade", base=text_model.kind, final_size=int(images.shape[-1]))
    row_classes = None if label_ids is None else [classes[k] for k in label_ids]
    files.append(write_prompts_json(out, row_prompts, per_prompt, {"sampling": sampling.model_dump(mode="json"),
                                                                   **origin}, labels=row_classes))
    return SampleResult(out, files, list(range(len(row_prompts))), row_prompts, sampling, source)


def prompted_stages(workflow_id: str | None, model: str | None, base: str, storage: str | None, search_base,
                    device: str, sr_overrides: dict[str, Any] | None) -> tuple[list, str]:
    """(the workflow's super-resolution stages, the base step) of ``--step cascade`` with prompts."""
    from pipelines.sample import superres_stages

    if model is not None:
        raise BadFlag("--step cascade samples a workflow's stages: give --workflow-id, not --model")
    if base not in ("dit", "distill"):
        raise BadFlag(f"--base must be dit or distill, got {base!r}")
    summary_uri, summary = find_summary(workflow_id, storage, search_base)
    return superres_stages(summary, summary_uri, device, prompted=True, **(sr_overrides or {})), base


def labelled_rows(meta: "DitMeta", labels: str | None, prompts: list[str]):
    """(label id of each row or None, the model's classes, prompt of each row): a text DiT's rows are its
    prompts; a class+text DiT's each prompt under each label, label-major. A mismatch of the model and
    the flags is a BadFlag naming them."""
    from components.dit.config import meta_uses_classes

    if not meta_uses_classes(meta):
        if labels:
            raise BadFlag("--labels: this model is conditioned on text only (dit.conditioning: text); drop --labels")
        return None, [], prompts
    if not labels:
        raise BadFlag("this model is conditioned on class and text (dit.conditioning: class+text): give --labels as "
                      "well as --prompt/--prompts (each prompt is drawn under each label, --per-prompt images each)")
    classes = meta.class_names()
    label_ids = parse_labels(labels, classes)
    return [k for k in label_ids for _ in prompts], classes, [p for _ in label_ids for p in prompts]


def student_drawing(text_model: TextModel, prompts: list[str], steps: int | None, seed: int | None, batch_size: int,
                    labels=None):
    """(the settings it samples with, a call drawing the prompts) of a distilled text student."""
    from components.distill.sample import generate_student, supported_steps

    steps = int(text_model.meta.native_steps) if steps is None else steps
    if steps not in supported_steps(text_model.meta):
        raise BadFlag(f"--steps {steps}: this student samples with {supported_steps(text_model.meta)} steps")
    seed = 0 if seed is None else seed
    draw = partial(generate_student, text_model.network, text_model.meta, text_model.ae, text_model.ae_meta, labels,
                   steps=steps, seed=seed, batch_size=batch_size, prompts=prompts)
    return SamplingConfig(steps=steps, guidance=0.0, seed=seed), draw


def workflow_text_model(workflow_id: str, step: str, storage: str | None, search_base, device: str):
    """(summary URI, TextModel) of a workflow's text DiT or its distilled student."""
    from components.autoencoder.load import load_autoencoder
    from components.distill.load import load_student
    from components.dit.load import load_dit

    if step not in ("dit", "distill"):
        raise BadFlag(f"--step {step}: prompts sample the text DiT (--step dit) or its student (--step distill)")
    summary_uri, summary = find_summary(workflow_id, storage, search_base)
    manifest = step_manifest(summary, step, summary_uri)
    network, meta = (load_dit(manifest, device=device, ema=True) if step == "dit"
                     else load_student(manifest, device=device))
    if meta.text is None:
        raise BadFlag(f"the {step} step of workflow {workflow_id!r} is class-conditional: give --labels, not prompts")
    ae, ae_meta = load_autoencoder(step_manifest(summary, AUTOENCODER_STEP, summary_uri), device=device)
    defaults = dit_sampling_defaults(manifest, meta) if step == "dit" else None
    return summary_uri, TextModel(step, network, meta, ae, ae_meta, defaults)


def registered_text_model(model_uri: str, tracking_uri: str | None, device: str) -> TextModel:
    """The TextModel of a registered text DiT or student generator."""
    import tempfile

    from pipelines.sample_registered import registered_generator

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SampleError("--model needs the registry: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="latentflow-sample-") as tmp:
        generator = registered_generator(uri, model_uri, Path(tmp), device)
    if not generator.takes_text:
        raise BadFlag(f"{model_uri} is class-conditional: give --labels, not prompts")
    defaults = generator.sampling().model_dump() if generator.kind == "dit" else None
    return TextModel(generator.kind, generator.denoiser, generator.meta, generator.ae, generator.ae_meta, defaults)
