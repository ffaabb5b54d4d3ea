"""Sampling a ControlledDiT: control images -> control latents -> ``components.dit.generate`` with the
latents in ``extra_args`` (so every sampler of the registry and classifier-free guidance work as for
the DiT: guidance doubles the control with the batch, so both branches get the residuals, as in
ControlNet's CFG), and the grid of control | samples rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

    from components.controlnet.model import ControlledDiT
    from components.dit.config import SamplingConfig
    from components.dit.load import DitMeta, SamplingFacts


def expected_control_shape(dit_meta: "DitMeta | SamplingFacts | dict") -> tuple[int, int, int]:
    """(channels, height, width) of a control image: the DiT's training images' (``dit_meta``: the DiT's
    meta, or controlnet.json's copy of its facts; typed or in the file's form)."""
    from components.dit.load import sampling_meta

    facts = sampling_meta(dit_meta)
    size = int(facts.image_size)
    return int(facts.image_channels), size, size


def check_control_images(controls: torch.Tensor, dit_meta: "DitMeta | SamplingFacts | dict", names: Sequence[str] | None = None) -> None:
    """uint8 (N, C, H, W) control images of the DiT's image shape, or ValueError naming both shapes."""
    expected = expected_control_shape(dit_meta)
    if controls.dtype != torch.uint8 or controls.dim() != 4:
        raise ValueError(f"control images are uint8 (N, C, H, W); got {controls.dtype} of shape {tuple(controls.shape)}")
    for i, control in enumerate(controls):
        if tuple(control.shape) != expected:
            name = names[i] if names else f"control image {i}"
            raise ValueError(f"{name}: is {'x'.join(map(str, control.shape))} (channels x height x width); this "
                             f"ControlNet takes {'x'.join(map(str, expected))} control images (the DiT's image size "
                             "and channels)")


def control_latents(ae: torch.nn.Module, ae_meta: dict, controls: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, C, H, W) control images -> scaled latents (N, c, h, w), fp32, encoded as the training images."""
    from components.autoencoder.load import encode_scaled

    with torch.inference_mode():
        parts = [encode_scaled(ae, ae_meta, controls[i:i + batch_size]).float()
                 for i in range(0, len(controls), batch_size)]
    return torch.cat(parts)


def generate_controlled(model: "ControlledDiT", dit_meta: "DitMeta | SamplingFacts | dict", ae: torch.nn.Module, ae_meta,
                        labels: Sequence[int] | torch.Tensor, controls: torch.Tensor, sampling: "SamplingConfig",
                        control_scale: float = 1.0, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) images, image i drawn for ``labels[i]`` under control image ``controls[i]``
    (uint8, the DiT's image shape) with the residuals times ``control_scale`` (0: the DiT's own sample)."""
    from components.dit.generate import generate

    check_control_images(controls, dit_meta)
    if len(controls) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(controls)} control images: one of each per image")
    latents = control_latents(ae, ae_meta, controls, batch_size)
    previous, model.control_scale = model.control_scale, float(control_scale)
    try:
        return generate(model, dit_meta, ae, ae_meta, labels, sampling, batch_size=batch_size, progress=progress,
                        extra={"control": latents})
    finally:
        model.control_scale = previous


def control_grid(controls: torch.Tensor, samples: torch.Tensor, per_control: int) -> "Image.Image":
    """One row per control image: the control, then its ``per_control`` samples (uint8 (N, C, H, W) each;
    samples in control order)."""
    from components.common.images import image_grid

    cells = []
    for k, control in enumerate(controls):
        cells.append(control.permute(1, 2, 0).numpy())
        cells += [s.permute(1, 2, 0).numpy() for s in samples[k * per_control:(k + 1) * per_control]]
    return image_grid(cells, nrow=per_control + 1)
