"""Typed stage metas for models built in a test (no step wrote them): the fields a test does not care
about get nominal values, so a test names only what it is about."""

from __future__ import annotations

from typing import Any

from components.autoencoder.load import AutoencoderMeta
from components.distill.load import StudentMeta
from components.dit.load import DitMeta


def dit_meta(**fields: Any) -> DitMeta:
    nominal = dict(preset="DiT-Micro/2", model={}, schedule="scaled_linear", num_timesteps=1000, prediction="eps",
                   learn_sigma=False, num_classes=1, null_label=None, latent_shape=[4, 4, 4], classes=None,
                   image_channels=1, image_size=8, flops_per_image=0.0, parameters=0, data="latents", max_steps=0,
                   ema_decay=0.0, sampling={})
    return DitMeta(**{**nominal, **fields})


def ae_meta(**fields: Any) -> AutoencoderMeta:
    nominal = dict(preset="ae-tiny", model={}, downsample_factor=2, latent_channels=4, latent_shape=[4, 4, 4],
                   image_size=8, channels=1, image_format="png", scale_factor=1.0, scale_from="sample", classes=None)
    # no regularizer: as the files from before VQ, which read as KL
    return AutoencoderMeta(**{**nominal, **fields})


def student_meta(teacher: DitMeta, **fields: Any) -> StudentMeta:
    nominal = dict(method="progressive", guidance=0.0, spacing="trailing", distill={}, native_steps=1,
                   teacher_cfg_weight=0.0)
    return StudentMeta.of_teacher(teacher, **{**nominal, **fields})
