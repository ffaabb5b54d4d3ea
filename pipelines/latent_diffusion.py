"""The latent diffusion pipeline, read as a recipe: one line per step, naming its component and inputs.

    shard ──► autoencoder ──► latents ──► dit ──► evaluate
      └──► superres_1 ──► superres_2 …   (with the cascade issue)

A preset includes the steps whose sections it has; inputs absent from a preset are dropped
(e.g. ``dit.data: pixels`` trains without the latents step).
"""

from __future__ import annotations

from components.autoencoder.train import run as train_autoencoder
from components.dit.train import run as train_dit
from components.evaluate.run import run as evaluate
from components.latents.run import run as encode_latents
from components.shard.run import run as shard
from pipelines.config import PipelineConfig
from pipelines.workflow import Workflow, step

RECIPE = [
    # step          component            inputs
    ("shard",       shard,               ()),
    ("autoencoder", train_autoencoder,   ("shard",)),
    ("latents",     encode_latents,      ("shard", "autoencoder")),
    ("dit",         train_dit,           ("shard", "autoencoder", "latents")),
    ("evaluate",    evaluate,            ("shard", "autoencoder", "dit")),
]


def build_workflow(cfg: PipelineConfig) -> Workflow:
    present = {name for name, _, _ in RECIPE if getattr(cfg, name) is not None}
    steps = [step(name, entry, getattr(cfg, name), tuple(i for i in inputs if i in present))
             for name, entry, inputs in RECIPE if name in present]
    return Workflow(cfg.name, steps)
