"""The pipeline config: one section per step plus ``storage``, ``tracking`` and ``ray``.

Later stages add their sections here; a step whose section is absent is not part of the pipeline.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field

from components.common.config import (
    RayConfig,
    StorageConfig,
    StrictModel,
    TrackingConfig,
    load_config,
)
from components.shard.config import ShardConfig


class PipelineConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"latentflow-{self.name}"

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_pipeline_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
