"""The pipeline config: one section per step plus ``storage``, ``tracking`` and ``ray``.

A step whose section is absent (or null) is not part of the pipeline; a step's section may only be
present when the sections of the steps it needs are.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from components.autoencoder.config import AutoencoderConfig
from components.common.config import RayConfig, StorageConfig, StrictModel, TrackingConfig, load_config
from components.distill.config import DistillConfig
from components.dit.config import DitConfig
from components.evaluate.config import EvaluateConfig, InceptionReferenceConfig, ReferenceTarget
from components.latents.config import LatentsConfig
from components.noisy_classifier.config import NoisyClassifierConfig
from components.shard.config import ShardConfig
from components.superres.config import SuperResConfig

SUPERRES_STEP = "superres_{}"  # the k-th stage's step name, k from 1


class RegistryConfig(StrictModel):
    """``latentflow retrain``'s model registry and promotion gate (see pipelines/registry.py)."""

    model_prefix: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")  # registered models <prefix>-<step>; None: name
    gate_metric: str = "sample_accuracy"  # an evaluate metric
    gate_mode: Literal["max", "min"] = "max"  # max for accuracies, min for distances
    margin: float = Field(0.0, ge=0)  # the new value must beat the champion's by more than this


class PipelineConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    autoencoder: AutoencoderConfig | None = None
    latents: LatentsConfig | None = None
    dit: DitConfig | None = None
    distill: DistillConfig | None = None  # needs the latents step (the student trains on its latents)
    # f(y | x_t, t) on the latents, for classifier guidance (needs the latents step; trains beside the DiT)
    noisy_classifier: NoisyClassifierConfig | None = None
    evaluate: EvaluateConfig | None = None
    # the cascade's super-resolution stages, lowest first: steps superres_1, superres_2, ...
    superres: list[SuperResConfig] | None = None

    @model_validator(mode="after")
    def _needed_sections_present(self):
        needs = {"latents": ["autoencoder"], "dit": ["autoencoder"], "evaluate": ["autoencoder", "dit"],
                 "distill": ["autoencoder", "latents", "dit"], "noisy_classifier": ["latents"]}
        if self.dit is not None and self.dit.data == "latents":
            needs["dit"].append("latents")
        for section, required in needs.items():
            missing = [r for r in required if getattr(self, section) is not None and getattr(self, r) is None]
            if missing:
                raise ValueError(f"section '{section}' needs section(s) {missing}")
        self._check_cascade()
        self._check_global_batches()
        if self.noisy_classifier and self.dit:
            mine, dits = self.noisy_classifier, self.dit
            if (mine.schedule, mine.num_timesteps) != (dits.schedule, dits.num_timesteps):
                raise ValueError(f"noisy_classifier is trained on schedule {mine.schedule!r} with {mine.num_timesteps} "
                                 f"steps, the DiT on {dits.schedule!r} with {dits.num_timesteps}: guidance needs "
                                 "the same forward process; set noisy_classifier.schedule/num_timesteps to the DiT's")
        inception = self.evaluate.inception if self.evaluate and self.evaluate.inception_enabled else None
        if inception and inception.cascade and self.superres and \
                inception.samples_per_class > self.evaluate.cascade_samples_per_class:
            raise ValueError(f"evaluate.inception.samples_per_class ({inception.samples_per_class}) is more than "
                             f"evaluate.cascade_samples_per_class ({self.evaluate.cascade_samples_per_class}); "
                             "lower it or set evaluate.inception.cascade: false")
        return self

    def _check_cascade(self) -> None:
        """Stage k's input size is the size below it (for stage 1 the base resolution the autoencoder
        and DiT work at: ``autoencoder.image_size``, else the shard images'); the first stage's
        hand-off from the latent base is non-truncated."""
        size = self.base_size
        for k, stage in enumerate(self.superres or [], start=1):
            if stage.input_size != size:
                raise ValueError(f"superres.{k - 1}.input_size is {stage.input_size}, but the stage below gives "
                                 f"{size} px (for the first stage: autoencoder.image_size, else shard.image_size)")
            if k == 1 and stage.sample.handoff == "truncated":
                raise ValueError("superres.0.sample.handoff: truncated needs a pixel-space stage below; the base "
                                 "DiT samples in latent space, so the first stage takes non_truncated")
            if k > 1 and stage.sample.handoff == "truncated":
                below = self.superres[k - 2]
                if (below.schedule, below.num_timesteps) != (stage.schedule, stage.num_timesteps):
                    raise ValueError(f"superres.{k - 1}.sample.handoff: truncated needs the stage below on the "
                                     "same schedule and num_timesteps")
            size = stage.output_size

    def _check_global_batches(self) -> None:
        """Every learned step's global batch must split into equal micro-batches over its workers."""
        sections = [(name, getattr(self, name)) for name in ("autoencoder", "dit", "distill", "noisy_classifier")]
        sections += [(f"superres.{k}", stage) for k, stage in enumerate(self.superres or [])]
        for name, section in sections:
            if section is not None:
                try:
                    section.train.micro_batch_size(section.resources.num_workers)
                except ValueError as e:
                    raise ValueError(f"{name}: {e} ({name}.resources.num_workers)") from None

    @property
    def base_size(self) -> int:
        """The resolution the autoencoder, DiT and evaluate work at."""
        return (self.autoencoder.image_size if self.autoencoder else None) or self.shard.image_size

    @property
    def inception_reference(self) -> InceptionReferenceConfig | None:
        """The real images' Inception features, a step derived from ``evaluate.inception``: one
        target per resolution the evaluate step scores (the base, and the cascade's final size)."""
        if self.evaluate is None or not self.evaluate.inception_enabled:
            return None
        inception = self.evaluate.inception
        targets = [ReferenceTarget(name="base", size=self.base_size)]
        if inception.cascade and self.superres:
            last = self.superres[-1]
            targets.append(ReferenceTarget(name="cascade", size=last.output_size, filter=last.filter))
        settings = inception.model_dump(exclude={"cascade", "enabled"})
        return InceptionReferenceConfig(resources=self.evaluate.resources, targets=targets, **settings)

    @property
    def superres_steps(self) -> list[str]:
        return [SUPERRES_STEP.format(k) for k in range(1, len(self.superres or []) + 1)]

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"latentflow-{self.name}"

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_pipeline_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
