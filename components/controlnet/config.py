"""Config of the ControlNet step: which control signal, how many DiT blocks are copied, and training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.common.config import StepConfig
from components.common.train_types import TrainConfig
from components.dit.config import SamplingConfig



class ControlNetConfig(StepConfig):
    # What the model is conditioned on, computed from each training image in the stream
    # (components/controlnet/signals.py), or read from ``folder`` (a user's control images by sample key)
    control: Literal["edges", "blur", "low_res", "folder"] = "edges"
    folder: str | None = None  # control: folder: <folder>/<sample key>.png for every training sample
    # edges: Sobel gradient magnitude of the image in [0, 1] (max 4 per axis, normalised), edge where > this
    edge_threshold: float = Field(0.25, gt=0)
    blur_sigma: float = Field(2.0, gt=0)  # blur: Gaussian sigma in pixels
    low_res_size: int = Field(8, ge=1)  # low_res: downsampled to this many pixels a side, then upsampled back
    # The first ``num_blocks`` DiT blocks are copied into the trainable branch (PixArt-delta: 13 of 28)
    num_blocks: int = Field(1, ge=1)
    # Label dropout: trains the unconditional branch (with the control kept) that guidance uses
    class_dropout_prob: float = Field(0.1, ge=0, lt=1)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=500, batch_size=64, lr=1e-3,
                                                                   ema_decay=0.99))
    sample: SamplingConfig = Field(default_factory=SamplingConfig)  # the grid's sampler settings
    control_scale: float = Field(1.0, ge=0)  # the residuals' multiplier for the grid and later sampling
    grid_controls: int = Field(8, ge=1)  # rows of the grid: validation images' controls
    grid_per_control: int = Field(4, ge=1)  # samples per control (columns after the control itself)

    @model_validator(mode="after")
    def _folder_follows_control(self) -> "ControlNetConfig":
        if self.control == "folder" and not self.folder:
            raise ValueError("controlnet.control: folder needs controlnet.folder (a directory of <sample key>.png)")
        if self.control != "folder" and self.folder:
            raise ValueError(f"controlnet.folder is for control: folder, but controlnet.control is {self.control!r}")
        return self
