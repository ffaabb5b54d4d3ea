"""Every learned stage against the resume contract (tests/resume_contract.py), and the check that
every learned step of the DAG has both contracts: a stage added later without its subclasses fails.

Each case is three runs of the step on tiny sizes (interrupted, resumed, uninterrupted), training in
this process (``resume_contract.local_fit``), upstream outputs built once for all of them on the
session's Ray cluster (``resume_upstream``).
"""

from __future__ import annotations

import importlib
import re

import pytest

from components.autoencoder.config import AutoencoderConfig
from components.controlnet.config import ControlNetConfig
from components.distill.config import DistillConfig
from components.dit.config import DitConfig
from components.noisy_classifier.config import NoisyClassifierConfig
from components.superres.config import SuperResConfig
from pipelines.dag import LATENT_DIFFUSION, LEARNED, steps_of_role
from resume_contract import ResumeContract, Upstream

TRAIN = dict(max_steps=4, batch_size=16, lr=1e-3, ema_decay=0.8, log_every=1, checkpoint_every=2)
CRASH_AT = 3  # after the step-2 checkpoint: the resumed run starts from step 2


@pytest.fixture(scope="module")
def resume_upstream(ray_cluster, tmp_path_factory) -> Upstream:
    from tests.test_distill import dit_step_output
    from tests.test_dit import tiny_latent_inputs

    root = tmp_path_factory.mktemp("upstream")
    inputs = tiny_latent_inputs(root)
    return Upstream(shard=inputs["shard"], autoencoder=inputs["autoencoder"], latents=inputs["latents"],
                    dit=dit_step_output(root, inputs["shard"].info["classes"]))


class TestAutoencoderResumes(ResumeContract):
    step, stage, task_key, crash_at_step = "autoencoder", "components.autoencoder.train", "autoencoder", CRASH_AT

    def config(self):
        return AutoencoderConfig(preset="ae-tiny", model={"in_channels": 1}, scale_estimate_samples=32,
                                 val_samples=8, train=TRAIN)

    def inputs(self, upstream):
        return {"shard": upstream.shard}


class TestLatentDitResumes(ResumeContract):
    step, stage, task_key, crash_at_step = "dit", "components.dit.train", "latents", CRASH_AT

    def config(self):
        return DitConfig(preset="DiT-Micro/2", train={**TRAIN, "zero_stage": 2}, sample={"steps": 2},
                         grid_per_label=1, grid_classes=2)

    def inputs(self, upstream):
        return {"shard": upstream.shard, "autoencoder": upstream.autoencoder, "latents": upstream.latents}


class TestPixelDitResumes(TestLatentDitResumes):
    task_key = "pixels"

    def config(self):
        return super().config().model_copy(update={"data": "pixels"})

    def inputs(self, upstream):
        return {"shard": upstream.shard, "autoencoder": upstream.autoencoder}


class TestSuperresResumes(ResumeContract):
    step, stage, task_key, crash_at_step = "superres", "components.superres.train", "superres", CRASH_AT
    step_name = "superres_1"

    def config(self):
        return SuperResConfig(input_size=8, output_size=16, preset="sr-tiny", class_conditional=True, train=TRAIN,
                              sample={"steps": 2}, eval_samples=4, grid_samples=2)

    def inputs(self, upstream):
        return {"shard": upstream.shard}


class TestProgressiveDistillResumes(ResumeContract):
    """Two rounds (4 -> 2 -> 1 steps), the crash inside round 2: round 1 is kept, round 2 resumes."""

    step, stage, task_key, crash_at_step = "distill", "components.distill.train", "progressive", CRASH_AT
    crash_in_round = 2

    def config(self):
        return DistillConfig(progressive={"start_steps": 4, "end_steps": 1}, grid_per_label=1, grid_classes=2,
                             train=TRAIN)

    def inputs(self, upstream):
        return {"autoencoder": upstream.autoencoder, "latents": upstream.latents, "dit": upstream.dit}


class TestConsistencyDistillResumes(TestProgressiveDistillResumes):
    """Consistency distillation: its target network (an EMA of the student) is in the checkpoint too."""

    task_key, crash_in_round = "consistency", None

    def config(self):
        return DistillConfig(method="consistency_distillation", consistency={"num_levels": 8, "sample_levels": [400]},
                             grid_per_label=1, grid_classes=2, train=TRAIN)


class TestNoisyClassifierResumes(ResumeContract):
    step, stage = "noisy_classifier", "components.noisy_classifier.train"
    task_key, crash_at_step = "noisy_classifier", CRASH_AT

    def config(self):
        return NoisyClassifierConfig(preset="nc-tiny", t_buckets=2, val_samples=8, train=TRAIN)

    def inputs(self, upstream):
        return {"latents": upstream.latents}


class TestControlNetResumes(ResumeContract):
    """The trainable copy and its zero layers resume; the frozen DiT is rebuilt from its manifest."""

    step, stage, task_key, crash_at_step = "controlnet", "components.controlnet.train", "controlnet", CRASH_AT

    def config(self):
        return ControlNetConfig(num_blocks=1, grid_controls=2, grid_per_control=1, sample={"steps": 2}, train=TRAIN)

    def inputs(self, upstream):
        return {"shard": upstream.shard, "autoencoder": upstream.autoencoder, "dit": upstream.dit}


# ---------------------------------------------------------------- every learned step has both contracts


def declared_step(name: str) -> str:
    """The DAG's declared name of a running step's name (superres_1 -> superres)."""
    for spec in LATENT_DIFFUSION:
        if name == spec.name or (spec.fan_out and re.fullmatch(spec.fan_out.format(r"\d+"), name)):
            return spec.name
    raise KeyError(f"{name}: no step of pipelines/dag.py is named so")


def all_subclasses(base: type) -> set[type]:
    return {found for cls in base.__subclasses__() for found in (cls, *all_subclasses(cls))}


def test_every_learned_step_has_a_stage_contract_and_a_resume_contract():
    import test_stage_contract  # noqa: F401 (its subclasses of StageContract)
    from stage_contract import StageContract

    learned = set(steps_of_role(LEARNED))
    staged = {declared_step(cls.step) for cls in all_subclasses(StageContract)}
    resumed = {cls.step for cls in all_subclasses(ResumeContract)}
    assert not learned - staged, f"learned steps without a StageContract subclass: {sorted(learned - staged)}"
    assert not learned - resumed, f"learned steps without a ResumeContract subclass: {sorted(learned - resumed)}"


def test_every_task_class_of_a_learned_stage_has_a_crashing_subclass_and_a_case():
    from crash_hooks import CRASHING

    cases = {(cls.stage, cls.task_key) for cls in all_subclasses(ResumeContract)}
    for spec in LATENT_DIFFUSION:
        if spec.role != LEARNED:
            continue
        stage = spec.component.split(":")[0]
        task_classes = importlib.import_module(stage).TASK_CLASSES
        for key, task_class in task_classes.items():
            assert task_class in CRASHING, f"tests/crash_hooks.py: no crashing subclass of {task_class.__name__}"
            assert (stage, key) in cases, f"{stage}.TASK_CLASSES[{key!r}]: no ResumeContract case crashes it"
