"""``latentflow sample --prompt "…" [--prompt "…"]… --per-prompt N`` (or ``--prompts FILE``): images of
a finished workflow's text-conditioned DiT (or, with ``--model models:/NAME@ALIAS``, a registered one), written as ``OUT/<prompt index>/<i>.png``, ``OUT/grid.png``
(one row per prompt) and ``OUT/prompts.json``.

Image i of prompt k uses noise stream k * N + i of the seed, as labels do: the same seed and prompts
give the same images whatever the batch size. Every sampler, guidance (against the empty caption) and
thresholding work as with classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipelines.prompts import PromptError, gather_prompts, write_prompts_json
from pipelines.sample import (AUTOENCODER_STEP, BadFlag, SampleError, SampleResult, dit_sampling_defaults,
                              find_summary, sampling_config, step_manifest, write_images)


def sample_prompts(workflow_id: str | None, prompts: list[str] | None, prompts_file: str | None, per_prompt: int,
                   out: str | os.PathLike, storage: str | None = None, sampler: str | None = None,
                   steps: int | None = None, guidance: float | None = None, eta: float | None = None,
                   seed: int | None = None, batch_size: int = 256, device: str = "cpu", progress: bool = True,
                   search_base: str | os.PathLike = ".", sampler_options: dict[str, Any] | None = None,
                   model: str | None = None, tracking_uri: str | None = None) -> SampleResult:
    """Generate ``per_prompt`` images for each prompt with the workflow's text DiT (or the registered
    ``model``'s, ``models:/NAME@ALIAS``) and write them."""
    from components.dit.generate import generate

    if per_prompt < 1:
        raise BadFlag(f"--per-prompt must be at least 1, got {per_prompt}")
    try:
        prompts = gather_prompts(prompts, prompts_file)
    except PromptError as e:
        raise BadFlag(str(e)) from None
    if model is not None:
        source, (dit, dit_meta, ae, ae_meta, defaults) = None, registered_text_model(model, tracking_uri, device)
    else:
        source, (dit, dit_meta, ae, ae_meta, defaults) = workflow_text_model(workflow_id, storage, search_base, device)
    sampling = sampling_config(defaults, sampler=sampler, steps=steps, guidance=guidance, eta=eta, seed=seed,
                               **(sampler_options or {}))
    every = [prompt for prompt in prompts for _ in range(per_prompt)]
    try:
        images = generate(dit, dit_meta, ae, ae_meta, None, sampling, batch_size=batch_size, progress=progress,
                          prompts=every)
    except ValueError as e:
        raise SampleError(str(e)) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_images(images, list(range(len(prompts))), per_prompt, out)
    origin = {"model": model} if model is not None else {"workflow_id": workflow_id}
    files.append(write_prompts_json(out, prompts, per_prompt, {"sampling": sampling.model_dump(mode="json"), **origin}))
    return SampleResult(out, files, list(range(len(prompts))), prompts, sampling, source or model)


def workflow_text_model(workflow_id: str, storage: str | None, search_base, device: str):
    """(summary URI, (dit, dit meta, autoencoder, its meta, sampling defaults)) of a workflow's text DiT."""
    from components.autoencoder.load import load_autoencoder
    from components.dit.load import load_dit

    summary_uri, summary = find_summary(workflow_id, storage, search_base)
    dit_manifest = step_manifest(summary, "dit", summary_uri)
    dit, dit_meta = load_dit(dit_manifest, device=device, ema=True)
    if dit_meta.get("conditioning") != "text":
        raise BadFlag(f"the dit step of workflow {workflow_id!r} is class-conditional: give --labels, not prompts")
    ae, ae_meta = load_autoencoder(step_manifest(summary, AUTOENCODER_STEP, summary_uri), device=device)
    return summary_uri, (dit, dit_meta, ae, ae_meta, dit_sampling_defaults(dit_manifest, dit_meta))


def registered_text_model(model_uri: str, tracking_uri: str | None, device: str):
    """(dit, dit meta, autoencoder, its meta, sampling defaults) of a registered text DiT generator."""
    import tempfile

    from pipelines.sample_registered import registered_generator

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SampleError("--model needs the registry: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="latentflow-sample-") as tmp:
        generator = registered_generator(uri, model_uri, Path(tmp), device)
    if not generator.takes_text:
        raise BadFlag(f"{model_uri} is class-conditional: give --labels, not prompts")
    if generator.kind != "dit":
        raise BadFlag(f"{model_uri} is a distilled student: prompts sample a text DiT generator for now")
    return generator.denoiser, generator.meta, generator.ae, generator.ae_meta, generator.sampling().model_dump()
