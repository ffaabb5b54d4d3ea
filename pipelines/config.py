"""The pipeline config: one section per step plus ``storage``, ``tracking`` and ``ray``.

A step whose section is absent (or null) is not part of the pipeline; a step's section may only be
present when the sections of the steps it needs are.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, model_validator

from components.autoencoder.config import AutoencoderConfig
from components.common.config import RayConfig, StorageConfig, StrictModel, TrackingConfig, load_config
from components.dit.config import DitConfig
from components.evaluate.config import EvaluateConfig
from components.latents.config import LatentsConfig
from components.shard.config import ShardConfig


class PipelineConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    autoencoder: AutoencoderConfig | None = None
    latents: LatentsConfig | None = None
    dit: DitConfig | None = None
    evaluate: EvaluateConfig | None = None

    @model_validator(mode="after")
    def _needed_sections_present(self):
        needs = {"latents": ["autoencoder"], "dit": ["autoencoder"], "evaluate": ["autoencoder", "dit"]}
        if self.dit is not None and self.dit.data == "latents":
            needs["dit"].append("latents")
        for section, required in needs.items():
            missing = [r for r in required if getattr(self, section) is not None and getattr(self, r) is None]
            if missing:
                raise ValueError(f"section '{section}' needs section(s) {missing}")
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"latentflow-{self.name}"

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_pipeline_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
