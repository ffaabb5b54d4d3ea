"""The latent diffusion workflow, built from its declaration in ``pipelines.dag``: each declared
step the config has becomes one workflow step (a fan-out, one per entry), its component imported
here, by the path the declaration names, and its inputs those of its declared inputs that the
config has."""

from __future__ import annotations

import importlib
from typing import Any

from pipelines.config import PipelineConfig
from pipelines.dag import LATENT_DIFFUSION, StepSpec
from pipelines.workflow import StageEntry, Step, Workflow, step


def build_workflow(cfg: PipelineConfig, dag: tuple[StepSpec, ...] = LATENT_DIFFUSION) -> Workflow:
    built: dict[str, list[str]] = {}  # declared name -> the workflow steps it became
    steps: list[Step] = []
    for spec in dag:
        section = getattr(cfg, spec.config_attribute)
        if section is None:
            continue
        built[spec.name] = spec.step_names(section)
        inputs = tuple(name for declared in spec.inputs for name in built.get(declared, ()))
        entry = component(spec.component)
        configs = section if spec.fan_out else [section]
        steps += [step(name, entry, config, inputs) for name, config in zip(built[spec.name], configs)]
    return Workflow(cfg.name, steps)


def component(path: str) -> StageEntry:
    """The stage entry ``"package.module:function"`` names."""
    module_name, _, function = path.partition(":")
    entry: Any = getattr(importlib.import_module(module_name), function)
    return entry
