"""Prompt adherence of text-conditioned samples of the bundled digits: do the samples show what their
prompts say?

Three measures, each over the samples whose prompt names that attribute:

- **digit accuracy**: the judge classifier's prediction against the digit the prompt names;
- **thickness and slant agreement**: the attributes measured on the sample (``digit_attributes``,
  with the ink tertiles and slant dead zone the shard step recorded for the training captions) against
  the prompt's words;
- **chance**: the agreement a random caption would get, ``sum_w p_prompt(w) p_sample(w)``: the expected
  agreement when prompts are shuffled across the same samples, so it accounts for the data's own
  imbalance (the bundled digits lean right: a model that always draws right-leaning digits agrees
  with "right" prompts for free, and this rate says how much).

There is no CLIP score: it needs pretrained CLIP weights, which nothing here downloads. The step's log
says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.shard.digit_attributes import DigitAttributes, measure, parse_caption

NO_CLIP_SCORE = ("no CLIP score: it needs pretrained CLIP weights, which latentflow never downloads; prompt "
                 "adherence is the judge's digit accuracy and the measured thickness and slant instead")
ATTRIBUTES = ("thickness", "slant")


@dataclass(frozen=True)
class Agreement:
    rate: float  # share of the samples whose measured attribute is the prompt's word
    chance: float  # the rate a random caption (the prompts shuffled) would get
    count: int  # samples whose prompt names the attribute


def agreement(named: Sequence[str], measured: Sequence[str]) -> Agreement:
    """The agreement of ``named`` (the prompts' words) and ``measured`` (the samples'), and its chance."""
    if len(named) != len(measured):
        raise ValueError(f"{len(named)} prompts' words but {len(measured)} measurements")
    if not named:
        return Agreement(float("nan"), float("nan"), 0)
    rate = float(np.mean([a == b for a, b in zip(named, measured)]))
    p_named, p_measured = Counter(named), Counter(measured)
    chance = sum(p_named[w] * p_measured[w] for w in p_named) / len(named) ** 2
    return Agreement(rate, float(chance), len(named))


def prompt_attributes(prompts: Sequence[str]) -> list[DigitAttributes]:
    """Each prompt's attributes; a prompt that names no digit is refused, naming it (nothing to check)."""
    parsed = [parse_caption(prompt) for prompt in prompts]
    unnamed = [prompt for prompt, p in zip(prompts, parsed) if p.digit is None]
    if unnamed:
        raise ValueError(f"prompt adherence needs prompts that name a digit; these do not: {unnamed[:3]}")
    return parsed


def attribute_agreement(images: np.ndarray, prompts: Sequence[str], caption_attributes: dict
                        ) -> dict[str, Agreement]:
    """Thickness and slant agreement of uint8 images (N, 1, H, W) with their prompts.
    ``caption_attributes``: the shard manifest's ``info["caption_attributes"]``."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    tertiles, dead_zone = caption_attributes["ink_tertiles"], caption_attributes["slant_dead_zone"]
    wanted = prompt_attributes(prompts)
    seen = [measure(image, p.digit, tertiles, dead_zone) for image, p in zip(images, wanted)]
    result = {}
    for name in ATTRIBUTES:
        pairs = [(getattr(w, name), getattr(s, name)) for w, s in zip(wanted, seen) if getattr(w, name)]
        result[name] = agreement([a for a, _ in pairs], [b for _, b in pairs])
    return result


def digit_accuracy(predicted: Sequence[int], prompts: Sequence[str]) -> float:
    """The share of samples the judge reads as the digit their prompt names."""
    wanted = prompt_attributes(prompts)
    if len(predicted) != len(wanted):
        raise ValueError(f"{len(predicted)} predictions but {len(wanted)} prompts")
    return float(np.mean([int(p) == w.digit for p, w in zip(predicted, wanted)])) if wanted else float("nan")


def adherence_metrics(predicted: Sequence[int], images: np.ndarray, prompts: Sequence[str],
                      caption_attributes: dict) -> dict[str, float]:
    """The evaluate step's metrics: ``prompt_digit_accuracy``, ``prompt_<attribute>_agreement`` and
    ``prompt_<attribute>_chance``."""
    metrics = {"prompt_digit_accuracy": digit_accuracy(predicted, prompts)}
    for name, result in attribute_agreement(images, prompts, caption_attributes).items():
        metrics[f"prompt_{name}_agreement"], metrics[f"prompt_{name}_chance"] = result.rate, result.chance
    return metrics
