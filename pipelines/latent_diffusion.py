"""The latent diffusion pipeline, read as a recipe: one line per step, naming its component and inputs.

    shard ──► autoencoder ──► latents ─┬─► dit ──► distill ──► evaluate
      │                                 └─► noisy_classifier  (classifier guidance)
      ├──► superres_1 ───────────────────────────────────┤
      ├──► superres_2 …  (one step per ``superres`` entry) ┤
      └──► inception_reference  (with evaluate.inception) ──┘

Each super-resolution stage needs only the shards, so on a cluster the stages train in parallel
with the autoencoder/DiT branch; they meet in evaluate, which scores the composed cascade.
``inception_reference`` (the real images' FID/KID features) also needs only the shards, so it is
computed once per dataset version and served from cache to every later evaluation.
A preset includes the steps whose sections it has; inputs absent from a preset are dropped
(e.g. ``dit.data: pixels`` trains without the latents step).
"""

from __future__ import annotations

from components.autoencoder.train import run as train_autoencoder
from components.distill.train import run as distill
from components.dit.train import run as train_dit
from components.evaluate.run import run as evaluate
from components.inception_reference.run import run as inception_reference
from components.latents.run import run as encode_latents
from components.noisy_classifier.train import run as train_noisy_classifier
from components.shard.run import run as shard
from components.superres.train import run as train_superres
from pipelines.config import PipelineConfig
from pipelines.workflow import Workflow, step

RECIPE = [
    # step                  component             inputs
    ("shard",               shard,                ()),
    ("inception_reference", inception_reference,  ("shard",)),
    ("autoencoder",         train_autoencoder,    ("shard",)),
    ("latents",             encode_latents,       ("shard", "autoencoder")),
    ("noisy_classifier",    train_noisy_classifier, ("latents",)),
    ("dit",                 train_dit,            ("shard", "autoencoder", "latents")),
    ("distill",             distill,              ("autoencoder", "latents", "dit")),
    ("evaluate",            evaluate,             ("shard", "autoencoder", "dit", "distill", "noisy_classifier",
                                                   "inception_reference")),
]


def build_workflow(cfg: PipelineConfig) -> Workflow:
    present = {name for name, _, _ in RECIPE if getattr(cfg, name) is not None}
    stages = [step(name, train_superres, stage, ("shard",))
              for name, stage in zip(cfg.superres_steps, cfg.superres or [])]
    steps = []
    for name, entry, inputs in RECIPE:
        if name not in present:
            continue
        inputs = tuple(i for i in inputs if i in present)
        if name == "evaluate":  # scores the composed cascade too
            inputs += tuple(cfg.superres_steps)
        steps.append(step(name, entry, getattr(cfg, name), inputs))
        if name == "shard":
            steps += stages
    return Workflow(cfg.name, steps)
