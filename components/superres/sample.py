"""Sampling a super-resolution stage, and the composed cascade: base -> SR 1 -> SR 2 ...

The hand-off between two stages (Ho et al. 2021, sec. 3.2), chosen by the *receiving* stage's
``sampling.handoff``:
- ``non_truncated``: the lower stage runs to t = 0; its output z is corrupted with q(z_s | z) at the
  receiving stage's fixed level s (``sampling.noise_cond_aug_level``) and s is given to the model;
- ``truncated``: the lower stage's reverse process stops at step s and its x_s is passed on as is,
  with s given to the model. The two stages must share their noise schedule (s is a level of both).
  The base DiT works in latent space, where a partially denoised x_s is no image, so the first SR
  stage always takes the non-truncated hand-off from it.

Text: a text stage (``meta["text"]``) takes one prompt per image; its pooled embedding travels in
``extra_args`` (``pooled``), so guidance doubles it with the rest and puts the empty caption's in the
unconditional half (``null_text``), nulling the class too where the stage has one.

Determinism: stage k draws sample i's noise from ``sample_generator(seed, i, k)``, so a seed fixes
every image whatever the batch size, as for the DiT alone. The cascade starts from the base's
finished images (``components.dit.generate.generate``), so it composes with any base sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from components.common.images import to_uint8
from components.diffusion import (
    Denoiser,
    NoiseSchedule,
    config_options,
    draw_per_sample,
    make_cfg_model_fn,
    per_sample_noise,
    run_sampler,
    sample_generator,
    spaced_timesteps,
    threshold_fn,
)
from components.superres.augment import max_level, sampling_conditioning
from components.superres.config import SuperResSamplingConfig

if TYPE_CHECKING:
    from components.superres.load import SuperResMeta


@dataclass
class SrStage:
    """A loaded stage: the model (EMA weights, eval mode), its meta and the sampler settings."""

    model: torch.nn.Module
    meta: "SuperResMeta"
    sampling: SuperResSamplingConfig

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_name(self.meta.schedule, int(self.meta.num_timesteps))

    def handoff_level(self) -> int:
        return max_level(self.schedule, self.sampling.noise_cond_aug_level)

    @property
    def takes_text(self) -> bool:
        return self.meta.get("text") is not None


def text_conditioning(stage: SrStage, prompts: Sequence[str] | None, batch: int) -> dict[str, torch.Tensor]:
    """``{"pooled": (N, Dp)}`` of a text stage's prompts (nothing for a stage without text)."""
    if not stage.takes_text:
        return {}
    if prompts is None or len(prompts) != batch:
        got = "none" if prompts is None else len(prompts)
        raise ValueError(f"the {stage.meta.get('input_size')}->{stage.meta.get('output_size')} px super-resolution "
                         f"stage is text-conditioned: it needs one prompt per image ({batch}), got {got}")
    return {"pooled": stage.model.encode_pooled(list(prompts))}


def super_resolve(stage: SrStage, low_res: torch.Tensor, generators: list[torch.Generator],
                  labels: torch.Tensor | None = None, cond_levels: torch.Tensor | None = None,
                  stop_at: int | None = None, prompts: Sequence[str] | None = None) -> torch.Tensor:
    """One stage's reverse process for a batch: float (N, C, out, out) in [-1, 1] (or x at level
    ``stop_at``, unclamped, for a truncated hand-off to the next stage).

    ``low_res``: the lower stage's output in [-1, 1]; corrupted here to the fixed level of
    ``stage.sampling.noise_cond_aug_level`` with noise from ``generators``. With ``cond_levels`` it is already
    the conditioning (a truncated hand-off's x_s at those levels) and is used as is. ``prompts``: one per
    image, for a text stage (``SrStage.takes_text``)."""
    model, meta, sampling = stage.model, stage.meta, stage.sampling
    schedule = stage.schedule
    device = next(model.parameters()).device
    low_res = low_res.to(device, torch.float32)
    if cond_levels is None:
        noise = draw_per_sample(generators, low_res.shape[1:], device)
        cond, levels = sampling_conditioning(low_res, stage.handoff_level(), schedule, noise)
    else:
        cond, levels = low_res, cond_levels.to(device)
    size, channels = int(meta.output_size), int(meta.channels)
    x = draw_per_sample(generators, (channels, size, size), device)
    timesteps = spaced_timesteps(schedule.num_timesteps, sampling.steps, sampling.spacing)
    if stop_at is not None:
        timesteps = timesteps[timesteps > stop_at]

    def conditional(x_t, t, y=None, *, low_res, noise_cond_aug_level, **text):
        return model(x_t, t, low_res, noise_cond_aug_level, y, **text)

    # Every condition travels in extra_args, none in a closure: classifier-free guidance then doubles
    # the low-res image and its level along with x_t and y (a closure's N rows met 2N of x_t).
    extra_args = {"low_res": cond, "noise_cond_aug_level": levels, **text_conditioning(stage, prompts, len(x))}
    classes = int(meta.num_classes) and labels is not None
    if classes or stage.takes_text:  # the class and/or the text nulled in the unconditional half
        null_text = {"pooled": model.null_pooled()} if stage.takes_text else None
        conditional = make_cfg_model_fn(conditional, int(meta.num_classes) if classes else None,
                                        sampling.guidance, null_text=null_text)
        if classes:
            extra_args["y"] = labels.to(device)
    denoiser = Denoiser(conditional, prediction=meta.prediction,
                        clip_x0=threshold_fn(sampling.thresholding, sampling.dynamic_threshold_percentile))
    out = run_sampler(sampling.sampler, denoiser, x, timesteps, schedule, noise=per_sample_noise(generators),
                      extra_args=extra_args, stop_at=stop_at, **config_options(sampling.sampler, sampling))
    return out if stop_at is not None else out.clamp(-1, 1)


def check_chain(base_size: int, stages: Sequence[SrStage]) -> None:
    """Each stage's input size is the output size of the one below; truncated hand-offs only
    between SR stages that share a schedule."""
    size = base_size
    for k, stage in enumerate(stages, start=1):
        if int(stage.meta.input_size) != size:
            raise ValueError(f"super-resolution stage {k} takes {stage.meta.input_size} px, but the stage below "
                             f"gives {size} px")
        if stage.sampling.handoff == "truncated":
            if k == 1:
                raise ValueError("stage 1: a truncated hand-off needs a pixel-space stage below; the base DiT "
                                 "samples in latent space (use handoff: non_truncated for the first stage)")
            below = stages[k - 2].meta
            if (below.schedule, below.num_timesteps) != (stage.meta.schedule, stage.meta.num_timesteps):
                raise ValueError(f"stage {k}: a truncated hand-off needs the stage below on the same noise schedule "
                                 f"({below.schedule}/{below.num_timesteps} vs "
                                 f"{stage.meta.schedule}/{stage.meta.num_timesteps})")
        size = int(stage.meta.output_size)


def cascade(base_images: torch.Tensor, stages: Sequence[SrStage], labels: Sequence[int] | torch.Tensor,
            seed: int, batch_size: int = 64, progress: Callable[[int], None] | None = None,
            prompts: Sequence[str] | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) at the last stage's size from the base's finished uint8 images (the DiT's
    samples of ``labels``), through each SR stage in turn, batch by batch. ``prompts`` (one per image)
    go to every text stage. ``progress(n)`` is called after each finished batch."""
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.long)
    if len(base_images) != len(labels) or len(labels) == 0:
        raise ValueError(f"cascade needs one base image per label and at least one: {len(base_images)} images, "
                         f"{len(labels)} labels")
    check_chain(int(base_images.shape[-1]), stages)
    if any(stage.takes_text for stage in stages) and (prompts is None or len(prompts) != len(labels)):
        texts = [k for k, stage in enumerate(stages, start=1) if stage.takes_text]
        raise ValueError(f"super-resolution stage(s) {texts} take text: the cascade needs one prompt per image "
                         f"({len(labels)}), got {'none' if prompts is None else len(prompts)}")
    chunks = []
    modes = [stage.model.training for stage in stages]
    for stage in stages:
        stage.model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(labels), batch_size):
                y = labels[start:start + batch_size]
                x = base_images[start:start + batch_size].float().div(127.5).sub(1.0)  # in [-1, 1]
                levels = None
                for k, stage in enumerate(stages, start=1):
                    generators = [sample_generator(seed, start + i, k) for i in range(len(y))]
                    following = stages[k] if k < len(stages) else None
                    truncated = following is not None and following.sampling.handoff == "truncated"
                    stop_at = following.handoff_level() if truncated else None
                    x = super_resolve(stage, x, generators, labels=y, cond_levels=levels, stop_at=stop_at,
                                      prompts=None if prompts is None else prompts[start:start + batch_size])
                    levels = None if stop_at is None else torch.full((len(y),), stop_at, dtype=torch.long)
                chunks.append(to_uint8(x).cpu())
                if progress is not None:
                    progress(len(y))
    finally:
        for stage, mode in zip(stages, modes):
            stage.model.train(mode)
    return torch.cat(chunks)
