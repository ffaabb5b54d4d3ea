"""The latent diffusion pipeline, read as a recipe: one line per step, naming its component and inputs.

    shard ──► autoencoder ──► latents ──► dit ──► distill ──► evaluate
      └──► superres_1 ──► superres_2 …

Steps arrive with their issues; a preset includes the steps whose sections it has.
"""

from __future__ import annotations

from components.shard.run import run as shard
from pipelines.config import PipelineConfig
from pipelines.workflow import Workflow, step


def build_workflow(cfg: PipelineConfig) -> Workflow:
    steps = [
        step("shard", shard, cfg.shard),
    ]
    return Workflow(cfg.name, steps)
