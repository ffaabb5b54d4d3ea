"""``latentflow sample --prompt "…" [--prompt "…"]… --per-prompt N`` (or ``--prompts FILE``): images of
a finished workflow's text-conditioned DiT, written as ``OUT/<prompt index>/<i>.png``, ``OUT/grid.png``
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


def sample_prompts(workflow_id: str, prompts: list[str] | None, prompts_file: str | None, per_prompt: int,
                   out: str | os.PathLike, storage: str | None = None, sampler: str | None = None,
                   steps: int | None = None, guidance: float | None = None, eta: float | None = None,
                   seed: int | None = None, batch_size: int = 256, device: str = "cpu", progress: bool = True,
                   search_base: str | os.PathLike = ".", sampler_options: dict[str, Any] | None = None,
                   ) -> SampleResult:
    """Generate ``per_prompt`` images for each prompt with the workflow's text DiT and write them."""
    from components.autoencoder.load import load_autoencoder
    from components.dit.generate import generate
    from components.dit.load import load_dit

    if per_prompt < 1:
        raise BadFlag(f"--per-prompt must be at least 1, got {per_prompt}")
    try:
        prompts = gather_prompts(prompts, prompts_file)
    except PromptError as e:
        raise BadFlag(str(e)) from None
    summary_uri, summary = find_summary(workflow_id, storage, search_base)
    dit_manifest = step_manifest(summary, "dit", summary_uri)
    dit, dit_meta = load_dit(dit_manifest, device=device, ema=True)
    if not dit_meta.uses_text:
        raise BadFlag(f"the dit step of workflow {workflow_id!r} is class-conditional: give --labels, not prompts")
    ae, ae_meta = load_autoencoder(step_manifest(summary, AUTOENCODER_STEP, summary_uri), device=device)
    sampling = sampling_config(dit_sampling_defaults(dit_manifest, dit_meta), sampler=sampler, steps=steps,
                               guidance=guidance, eta=eta, seed=seed, **(sampler_options or {}))
    every = [prompt for prompt in prompts for _ in range(per_prompt)]
    try:
        images = generate(dit, dit_meta, ae, ae_meta, None, sampling, batch_size=batch_size, progress=progress,
                          prompts=every)
    except ValueError as e:
        raise SampleError(str(e)) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_images(images, list(range(len(prompts))), per_prompt, out)
    files.append(write_prompts_json(out, prompts, per_prompt, {"sampling": sampling.model_dump(mode="json"),
                                                               "workflow_id": workflow_id}))
    return SampleResult(out, files, list(range(len(prompts))), prompts, sampling, summary_uri)
