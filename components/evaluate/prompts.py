"""The evaluate step's prompts for a text-conditioned DiT, and what it measures with them.

The prompts are real captions: the first ``per_class`` validation captions of each class (cycled when a
class has fewer), so the same step works on any captioned, labelled data set and each prompt's class
is known from its image. A class+text DiT draws each prompt under that class as its label. The judge's accuracy is then "the digit the prompt names". Where the captions
are the bundled digits' measured attributes (the shard manifest's ``caption_attributes``), thickness
and slant agreement and their chance rates are added (``components.evaluate.adherence``). There is no
CLIP score offline: ``NO_CLIP_SCORE`` is logged.
"""

from __future__ import annotations

import logging

import torch

from components.common.step import Manifest
from components.evaluate.adherence import NO_CLIP_SCORE, adherence_metrics
from components.evaluate.judge import EvaluateError

PROMPT_GRID = "eval_prompts.png"  # a row per prompt (the first few), its samples across
PROMPT_GRID_ROWS = 10
PROMPTS_FILE = "eval_prompts.json"

log = logging.getLogger(__name__)


def prompts_per_class(shard: Manifest, classes: list[str], per_class: int) -> list[str]:
    """``per_class`` validation captions of each class, class-major (the order of the labels the step
    samples), read in one verified pass that stops once every class has enough."""
    from components.common.data import image_split, split_labelled_captions

    wanted = {k: [] for k in range(len(classes))}
    for label, caption in split_labelled_captions(image_split(shard, "val", captions=True)):
        found = wanted.get(label)  # None: unlabelled, or a class the step does not judge
        if found is not None and len(found) < per_class:
            found.append(caption)
            if all(len(found) >= per_class for found in wanted.values()):
                break
    empty = [classes[k] for k, found in wanted.items() if not found]
    if empty:
        raise EvaluateError(f"evaluate: the shard step's validation split has no captions of class(es) {empty}; "
                            "a text-conditioned DiT is judged on prompts taken from there")
    return [found[i % len(found)] for found in wanted.values() for i in range(per_class)]


def prompt_metrics(shard: Manifest, images: torch.Tensor, predicted, prompts: list[str]) -> dict[str, float]:
    """Adherence metrics of prompted samples: attribute agreement where the captions carry measured
    attributes; the digit accuracy is the step's own ``sample_accuracy``."""
    log.info("evaluate: %s", NO_CLIP_SCORE)
    attributes = shard.info.get("caption_attributes")
    if attributes is None:
        return {}
    return adherence_metrics(list(predicted), images.numpy(), prompts, attributes)


def grid_prompts(prompts: list[str], classes: int) -> list[tuple[str, int]]:
    """The prompt grid's rows as (prompt, its class): the first prompt of each class, then the next ones,
    PROMPT_GRID_ROWS at most (``prompts`` class-major, as ``prompts_per_class`` gives them; a class+text
    DiT draws each row under its class)."""
    per_class = len(prompts) // max(classes, 1)
    order = [(prompts[k * per_class + i], k) for i in range(per_class) for k in range(classes)]
    return list(dict.fromkeys(order))[:PROMPT_GRID_ROWS]
