"""Classifier-free guidance and x̂_0 thresholding — Ho & Salimans 2022; Saharia et al. 2022 (Imagen)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_weight: float) -> torch.Tensor:
    """ε̃ = (1+w)·ε(x, y) − w·ε(x, ∅) — Ho & Salimans 2022, eq. 6; w = 0 is the conditional model.

    Other papers write a scale s = 1 + w: ε̃ = s·ε_c + (1−s)·ε_u (see `guidance_weight_from_scale`). The weights
    sum to one, so combining x0- or v-predictions this way equals combining the ε they imply.
    """
    return (1.0 + guidance_weight) * eps_cond - guidance_weight * eps_uncond


def guidance_weight_from_scale(scale: float) -> float:
    """w = s − 1: converts the "guidance scale" convention s·ε_c + (1−s)·ε_u to Ho & Salimans' weight w."""
    return scale - 1.0


# The text condition's keys in extra_args (the DiT's keyword arguments) and the ones a null text replaces.
TEXT_CONDITION_KEYS = ("context", "context_mask", "pooled")


def make_cfg_model_fn(
    model_fn: Callable[..., torch.Tensor],
    null_label: int | torch.Tensor | None,
    guidance_weight: float,
    null_text: dict[str, torch.Tensor] | None = None,
) -> Callable[..., torch.Tensor]:
    """Guided fn(x_t, t, y, **cond) running cond and uncond as one batch — Ho & Salimans 2022, alg. 2.

    `null_label` is the class id (or conditioning tensor for one example) that means "no condition".
    Only y is nulled; every other conditioning tensor in `cond` (a low-resolution image and its noise
    level, later text or a control image) is the same in both halves, so it is doubled here, in the one
    place that doubles the batch: a model never sees 2N rows of x_t against N rows of a condition.
    With learned variance (2C output channels) only the first C are guided; Σ comes from the conditional
    branch. Bind y for a sampler with `functools.partial(fn, y=labels)` or pass it in `extra_args`.

    Text: `null_text` is the encoder's null (the empty caption's `context`, `context_mask`, `pooled`, one
    row); the unconditional half gets it in place of the text condition (`text_null_half`). A text-only
    model has no class: y is None and `null_label` None. Without `null_text` the text is doubled as it
    is, like any other condition, and only the class is guided.
    """

    def guided(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if guidance_weight == 0:
            return model_fn(x_t, t, y, **cond)
        batch = x_t.shape[0]
        text = {name: cond.pop(name) for name in TEXT_CONDITION_KEYS if name in cond}
        if y is None and not (text and null_text is not None):
            raise ValueError("classifier-free guidance needs a condition to null: class labels y, or text with null_text")
        doubled = doubled_conditioning(cond, batch)
        doubled |= text_null_half(text, null_text, batch) if null_text is not None else doubled_conditioning(text, batch)
        y_both = None if y is None else torch.cat([y, null_labels(y, null_label)])
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), y_both, **doubled)
        out_cond, out_uncond = out.chunk(2, dim=0)
        channels = x_t.shape[1]
        guided_part = cfg_combine(out_cond[:, :channels], out_uncond[:, :channels], guidance_weight)
        return torch.cat([guided_part, out_cond[:, channels:]], dim=1)

    return guided


def null_labels(y: torch.Tensor, null_label: int | torch.Tensor | None) -> torch.Tensor:
    if null_label is None:
        raise ValueError("classifier-free guidance got class labels y but no null_label to replace them with")
    if isinstance(null_label, torch.Tensor):
        return null_label.to(y.device, y.dtype).expand_as(y)
    return torch.full_like(y, null_label)


def text_null_half(text: dict[str, Any], null_text: dict[str, torch.Tensor], batch_size: int) -> dict[str, Any]:
    """The text condition for the cond/uncond batch: the N given rows, then N rows of the null text.

    Both are padded to the longer token count, padding masked out, so a prompt longer or shorter than
    the empty caption's bos/eos concatenates (a padded token is never attended to, so the result is the
    same as encoding each half alone)."""
    missing = [name for name in TEXT_CONDITION_KEYS if name in null_text and name not in text]
    if missing:
        raise ValueError(f"null_text has {missing} but the conditioning does not: the halves would differ in kind")
    text = {name: check_rows(name, value, batch_size) if isinstance(value, torch.Tensor) else value
            for name, value in text.items()}
    doubled = {}
    if "context" in text:
        context = text["context"]
        null = null_text["context"].to(context.device, context.dtype).expand(batch_size, -1, -1)  # (N, L0, D)
        length = max(context.shape[1], null.shape[1])
        given = pad_tokens(context, token_mask(context, text.get("context_mask")), length)  # (N, L, D), (N, L)
        nulled = pad_tokens(null, token_mask(null, null_text.get("context_mask")), length)  # (N, L, D), (N, L)
        doubled["context"] = torch.cat([given[0], nulled[0]])  # (2N, L, D)
        doubled["context_mask"] = torch.cat([given[1], nulled[1]])  # (2N, L)
    if "pooled" in text:
        pooled = text["pooled"]
        doubled["pooled"] = torch.cat([pooled, null_text["pooled"].to(pooled.device, pooled.dtype).expand_as(pooled)])
    rest = {name: value for name, value in text.items() if name not in doubled}
    return doubled | doubled_conditioning(rest, batch_size)


def token_mask(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The (N, L) bool mask of real tokens, expanded to the tokens' rows; None means every token is real."""
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return mask.to(tokens.device, torch.bool).expand(tokens.shape[0], -1)


def pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) tokens and (N, L) mask padded with masked-out zeros to ``length`` tokens."""
    extra = length - tokens.shape[1]
    if extra == 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def doubled_conditioning(cond: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Each per-example tensor of `cond` stacked on itself (N -> 2N rows) for the cond/uncond batch;
    values that are not tensors (None, a flag) pass as they are. A tensor without N rows is refused,
    naming it: guessing whether it broadcasts would hide a wrongly shaped condition."""
    doubled = {}
    for name, value in cond.items():
        if isinstance(value, torch.Tensor):
            value = torch.cat([check_rows(name, value, batch_size)] * 2)
        doubled[name] = value
    return doubled


def check_rows(name: str, value: torch.Tensor, batch_size: int) -> torch.Tensor:
    if value.dim() == 0 or value.shape[0] != batch_size:
        raise ValueError(f"classifier-free guidance doubles the batch: conditioning {name!r} needs "
                         f"{batch_size} rows (one per example), got shape {tuple(value.shape)}")
    return value


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
