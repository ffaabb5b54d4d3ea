"""The latent diffusion pipeline as plain data: every step, its component, its inputs and the
sections it needs, declared once. No torch and no stage code is imported here, so the config can
check itself against the DAG (``pipelines.config``) without loading a model; ``build_workflow``
(``pipelines.latent_diffusion``) imports a component only when it builds its step.

    shard ──► autoencoder ──► latents ─┬─► dit ──► distill ──► evaluate
      │                                 │    └──► controlnet  (spatial control of the frozen DiT)
      │                                 └─► noisy_classifier  (classifier guidance)
      ├──► superres_1 ───────────────────────────────────┤
      ├──► superres_2 …  (one step per ``superres`` entry) ┤
      └──► inception_reference  (with evaluate.inception) ──┘

Each super-resolution stage needs only the shards, so on a cluster the stages train in parallel
with the autoencoder/DiT branch; they meet in evaluate, which scores the composed cascade.
``inception_reference`` (the real images' FID/KID features) also needs only the shards, so it is
computed once per dataset version and served from cache to every later evaluation.

A config includes the steps whose sections it has. An input whose step the config lacks is
dropped (e.g. ``dit.data: pixels`` trains without the latents step), unless the step ``needs``
it: then the config is refused at load, naming both sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepSpec:
    name: str
    component: str  # "package.module:function", the stage's entry, imported when the workflow is built
    inputs: tuple[str, ...] = ()  # in order; a fan-out's name stands for all of its steps
    needs: tuple[str, ...] = ()  # of the inputs, those whose sections the config must have
    # (input, field of this step's section, value): needed only while that field has that value
    needs_when: tuple[tuple[str, str, Any], ...] = ()
    config: str = ""  # the PipelineConfig attribute holding the step's config; "": the step's name
    fan_out: str = ""  # the config is a list: one step per entry, named fan_out.format(k), k from 1
    # What the step is, for the checks and the MLflow records that treat kinds of steps alike:
    #   "data" writes a data set (run inputs of the steps that read it), "learned" trains through the
    #   shared trainer (global batch and precision checks), "evaluation" reads data sets to score them.
    role: str = ""

    @property
    def config_attribute(self) -> str:
        return self.config or self.name

    def needed_sections(self, section: Any) -> list[str]:
        """The sections this step needs, given its own (present) section."""
        conditional = [needed for needed, field, value in self.needs_when if getattr(section, field) == value]
        return list(self.needs) + conditional

    def step_names(self, section: Any) -> list[str]:
        """The workflow steps this declaration becomes for its (present) section."""
        if not self.fan_out:
            return [self.name]
        return [self.fan_out.format(k) for k in range(1, len(section) + 1)]

    def section_keys(self, section: Any) -> list[tuple[str, Any]]:
        """(dotted config key, section) of each step this declaration becomes: ``dit``, ``superres.0``."""
        if not self.fan_out:
            return [(self.config_attribute, section)]
        return [(f"{self.config_attribute}.{k}", entry) for k, entry in enumerate(section)]


SUPERRES_STEP = "superres_{}"  # the k-th stage's step name, k from 1
DATA, LEARNED, EVALUATION = "data", "learned", "evaluation"

LATENT_DIFFUSION: tuple[StepSpec, ...] = (
    StepSpec("shard", "components.shard.run:run", role=DATA),
    StepSpec("superres", "components.superres.train:run", ("shard",), fan_out=SUPERRES_STEP, role=LEARNED),
    # its config is derived from evaluate.inception (PipelineConfig.inception_reference)
    StepSpec("inception_reference", "components.inception_reference.run:run", ("shard",), role=EVALUATION),
    StepSpec("autoencoder", "components.autoencoder.train:run", ("shard",), role=LEARNED),
    StepSpec("latents", "components.latents.run:run", ("shard", "autoencoder"), needs=("autoencoder",),
             role=DATA),
    StepSpec("noisy_classifier", "components.noisy_classifier.train:run", ("latents",), needs=("latents",),
             role=LEARNED),
    StepSpec("dit", "components.dit.train:run", ("shard", "autoencoder", "latents"), needs=("autoencoder",),
             needs_when=(("latents", "data", "latents"),), role=LEARNED),
    # a ControlNet branch over the frozen DiT: spatial control (edges, blur, low_res, a folder) of its samples
    StepSpec("controlnet", "components.controlnet.train:run", ("shard", "autoencoder", "dit"),
             needs=("autoencoder", "dit"), role=LEARNED),
    StepSpec("distill", "components.distill.train:run", ("autoencoder", "latents", "dit"),
             needs=("autoencoder", "latents", "dit"), role=LEARNED),
    StepSpec("evaluate", "components.evaluate.run:run",
             ("shard", "autoencoder", "dit", "distill", "noisy_classifier", "inception_reference", "superres",
              "controlnet"),
             needs=("autoencoder", "dit"), role=EVALUATION),
)


def steps_of_role(role: str, recipe: tuple[StepSpec, ...] = LATENT_DIFFUSION) -> tuple[str, ...]:
    """The declared names of the recipe's steps of one role (a fan-out by its declared name)."""
    return tuple(spec.name for spec in recipe if spec.role == role)
