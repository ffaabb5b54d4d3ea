"""The DAG declared once (``pipelines.dag``): the workflows built from it, the config's "section X
needs section Y" checks derived from it, and the preset checks at load."""

from __future__ import annotations

import json
import subprocess
import sys
import typing

import pytest
from pydantic import BaseModel

from components.common.config import ConfigError
from conftest import REPO
from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.dag import DATA, EVALUATION, LATENT_DIFFUSION, LEARNED, steps_of_role
from pipelines.latent_diffusion import build_workflow

PINNED = json.loads((REPO / "tests" / "data" / "preset_workflows.json").read_text())


@pytest.mark.parametrize("variant", sorted(PINNED))
def test_each_preset_builds_the_workflow_it_built_before_the_dag_was_data(variant):
    """tests/data/preset_workflows.json holds each workflow's steps, components and inputs as
    ``build_workflow`` made them before the DAG became one declaration (issue 16)."""
    pinned = PINNED[variant]
    cfg = load_pipeline_config(REPO / "configs" / "pipeline" / f"{pinned['preset']}.yaml", pinned["overrides"])
    built = [[s.name, f"{s.entry.__module__}:{s.entry.__name__}", list(s.inputs)] for s in build_workflow(cfg).steps]
    assert built == pinned["steps"]


def test_the_declaration_imports_no_torch_and_no_stage_code():
    code = ("import sys; import pipelines.dag, pipelines.latent_diffusion; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.endswith(('.train', '.run', '.reference'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_every_declared_input_and_need_is_a_step_declared_before_it():
    seen: set[str] = set()
    for spec in LATENT_DIFFUSION:
        needed = set(spec.needs) | {needed for needed, _, _ in spec.needs_when}
        assert set(spec.inputs) <= seen, spec.name
        assert needed <= set(spec.inputs), spec.name
        seen.add(spec.name)


def test_a_missing_needed_section_is_named_and_every_one_is_named():
    with pytest.raises(ValueError, match=r"section 'dit' needs section\(s\) \['autoencoder', 'latents'\]"):
        PipelineConfig(name="x", dit={})
    PipelineConfig(name="x", autoencoder={}, dit={"data": "pixels"})  # pixels: no latents needed
    with pytest.raises(ValueError) as e:
        PipelineConfig(name="x", dit={"data": "pixels"}, noisy_classifier={})
    assert "section 'noisy_classifier' needs section(s) ['latents']" in str(e.value)
    assert "section 'dit' needs section(s) ['autoencoder']" in str(e.value)


def preset_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The dotted key of every ``preset`` field under ``model`` (a list's entries as ``.0``)."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if name == "preset":
            keys.append(key)
        for inner, is_list in nested_models(field.annotation):
            keys += preset_keys(inner, f"{key}.0." if is_list else f"{key}.")
    return keys


def nested_models(annotation, in_list: bool = False) -> list[tuple[type[BaseModel], bool]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, in_list)]
    is_list = typing.get_origin(annotation) is list
    return [found for arg in typing.get_args(annotation) for found in nested_models(arg, in_list or is_list)]


def test_each_step_declares_its_role_and_the_checks_follow_it():
    """The learned steps' checks and the MLflow data-set records read the roles, not lists of names."""
    from pipelines.workflow_tracking import DATASET_STEPS, EVALUATION_STEPS

    assert all(spec.role in (DATA, LEARNED, EVALUATION) for spec in LATENT_DIFFUSION)
    assert (DATASET_STEPS, EVALUATION_STEPS) == (("shard", "latents"), ("inception_reference", "evaluate"))
    config = load_pipeline_config(REPO / "configs" / "pipeline" / "imagenet256.yaml", [])
    learned = [key for key, _ in config._learned_sections()]
    assert learned == ["superres.0", "superres.1", "autoencoder", "dit", "distill"]
    assert all(hasattr(section, "train") for _, section in config._learned_sections())
    assert set(steps_of_role(LEARNED)) == {"superres", "autoencoder", "noisy_classifier", "dit", "controlnet", "distill"}


def test_every_learned_step_whose_batch_does_not_split_is_named_at_once():
    with pytest.raises(ConfigError) as refused:
        load_pipeline_config(REPO / "configs" / "pipeline" / "smoke.yaml",
                             ["dit.resources.num_workers=7", "superres.0.resources.num_workers=7"])
    assert "superres.0: " in str(refused.value) and "dit: " in str(refused.value)


def test_the_walk_finds_the_preset_fields_of_the_stages():
    assert {"autoencoder.preset", "dit.preset", "superres.0.preset", "noisy_classifier.preset",
            "evaluate.classifier.preset", "evaluate.cascade_classifier.preset"} <= set(preset_keys(PipelineConfig))


@pytest.mark.parametrize("key", preset_keys(PipelineConfig))
def test_every_preset_field_is_checked_when_the_config_loads(key):
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(REPO / "configs" / "pipeline" / "smoke.yaml", [f"{key}=no-such-preset"])
    text = str(e.value)
    assert f"'{key}'" in text and "'no-such-preset'" in text and "valid presets" in text
