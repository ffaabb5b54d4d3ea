"""Classifier-free guidance and x̂_0 thresholding — Ho & Salimans 2022; Saharia et al. 2022 (Imagen)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_weight: float) -> torch.Tensor:
    """ε̃ = (1+w)·ε(x, y) − w·ε(x, ∅) — Ho & Salimans 2022, eq. 6; w = 0 is the conditional model.

    Other papers write a scale s = 1 + w: ε̃ = s·ε_c + (1−s)·ε_u (see `guidance_weight_from_scale`). The weights
    sum to one, so combining x0- or v-predictions this way equals combining the ε they imply.
    """
    return (1.0 + guidance_weight) * eps_cond - guidance_weight * eps_uncond


def guidance_weight_from_scale(scale: float) -> float:
    """w = s − 1: converts the "guidance scale" convention s·ε_c + (1−s)·ε_u to Ho & Salimans' weight w."""
    return scale - 1.0


def make_cfg_model_fn(
    model_fn: Callable[..., torch.Tensor],
    null_label: int | torch.Tensor,
    guidance_weight: float,
) -> Callable[..., torch.Tensor]:
    """Guided fn(x_t, t, y, **cond) running cond and uncond as one batch — Ho & Salimans 2022, alg. 2.

    `null_label` is the class id (or conditioning tensor for one example) that means "no condition".
    Only y is nulled; every other conditioning tensor in `cond` (a low-resolution image and its noise
    level, later text or a control image) is the same in both halves, so it is doubled here, in the one
    place that doubles the batch: a model never sees 2N rows of x_t against N rows of a condition.
    With learned variance (2C output channels) only the first C are guided; Σ comes from the conditional
    branch. Bind y for a sampler with `functools.partial(fn, y=labels)` or pass it in `extra_args`.
    """

    def guided(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **cond) -> torch.Tensor:
        if guidance_weight == 0:
            return model_fn(x_t, t, y, **cond)
        if isinstance(null_label, torch.Tensor):
            y_null = null_label.to(y.device, y.dtype).expand_as(y)
        else:
            y_null = torch.full_like(y, null_label)
        doubled = doubled_conditioning(cond, x_t.shape[0])
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y_null]), **doubled)
        out_cond, out_uncond = out.chunk(2, dim=0)
        channels = x_t.shape[1]
        guided_part = cfg_combine(out_cond[:, :channels], out_uncond[:, :channels], guidance_weight)
        return torch.cat([guided_part, out_cond[:, channels:]], dim=1)

    return guided


def doubled_conditioning(cond: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Each per-example tensor of `cond` stacked on itself (N -> 2N rows) for the cond/uncond batch;
    values that are not tensors (None, a flag) pass as they are. A tensor without N rows is refused,
    naming it: guessing whether it broadcasts would hide a wrongly shaped condition."""
    doubled = {}
    for name, value in cond.items():
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != batch_size:
                raise ValueError(f"classifier-free guidance doubles the batch: conditioning {name!r} needs "
                                 f"{batch_size} rows (one per example), got shape {tuple(value.shape)}")
            value = torch.cat([value, value])
        doubled[name] = value
    return doubled


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Clamp x̂_0 to [−1, 1] — Ho et al. 2020 (the data range)."""
    return x0.clamp(-1.0, 1.0)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """s = max(1, quantile_p |x̂_0|) per example, x̂_0 ← clamp(x̂_0, −s, s)/s — Saharia et al. 2022, sec. 2.3."""
    flat = x0.reshape(x0.shape[0], -1)
    quantile_dtype = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float32
    s = torch.quantile(flat.abs().to(quantile_dtype), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


THRESHOLDINGS = ("none", "static", "dynamic")


def threshold_fn(thresholding: str, percentile: float = 0.995) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The clip_x0 of a Denoiser for a sampling config's ``thresholding`` (and ``dynamic_threshold_percentile``).

    Static clamps x̂_0 to [−1, 1], dynamic is Imagen's percentile rescaling: both assume data in
    [−1, 1], true of pixels but not of scaled latents (unit variance, not unit range), so in latent
    space thresholding is usually off ("none")."""
    if thresholding == "static":
        return static_threshold
    if thresholding == "dynamic":
        return partial(dynamic_threshold, percentile=percentile)
    if thresholding == "none":
        return None
    raise ValueError(f"unknown thresholding {thresholding!r}; choose one of {THRESHOLDINGS}")
