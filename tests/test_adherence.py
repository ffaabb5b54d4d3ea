"""Prompt adherence (components/evaluate/adherence.py): digit accuracy, attribute agreement against the
prompts' words, and the rate a random caption would get. Pure numpy on synthetic strokes."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluate.adherence import adherence_metrics, agreement, attribute_agreement, digit_accuracy
from components.shard.digit_attributes import SLANT_DEAD_ZONE, class_tertiles
from test_digit_attributes import bar

TERTILES = class_tertiles(np.stack([bar(w) for w in [1, 1, 2, 3, 3, 4, 5, 6, 6]]), np.full(9, 7))
ATTRIBUTES = {"ink_tertiles": TERTILES, "slant_dead_zone": SLANT_DEAD_ZONE}
PROMPTS = ["a thin seven leaning left", "7, thick, slanted right", "a thick seven standing upright",
           "the digit seven, thin stroke, upright"]


def test_samples_that_show_their_prompts_agree_and_mismatched_ones_do_not():
    faithful = np.stack([bar(1, -0.4), bar(6, 0.4), bar(6), bar(1)])[:, None]
    result = attribute_agreement(faithful, PROMPTS, ATTRIBUTES)
    assert (result["thickness"].rate, result["slant"].rate) == (1.0, 1.0)
    contrary = np.stack([bar(6, 0.4), bar(1, -0.4), bar(1, 0.4), bar(6, -0.4)])[:, None]
    result = attribute_agreement(contrary, PROMPTS, ATTRIBUTES)
    assert (result["thickness"].rate, result["slant"].rate) == (0.0, 0.0)
    assert result["thickness"].count == 4


def test_chance_is_the_agreement_of_shuffled_prompts():
    named, measured = ["right"] * 8 + ["left"] * 2, ["right"] * 9 + ["left"]
    result = agreement(named, measured)
    assert result.chance == pytest.approx(0.8 * 0.9 + 0.2 * 0.1)  # a right-leaning model gains for free
    rng = np.random.default_rng(0)
    shuffled = np.mean([agreement(list(rng.permutation(named)), measured).rate for _ in range(4000)])
    assert shuffled == pytest.approx(result.chance, abs=0.02)
    assert result.rate == 0.9


def test_digit_accuracy_reads_the_digit_each_prompt_names():
    assert digit_accuracy([7, 7, 1, 7], PROMPTS) == 0.75
    assert digit_accuracy([3, 9], ["a thick three", "9, thin, upright"]) == 1.0
    with pytest.raises(ValueError, match="name a digit; these do not: \\['a thick stroke'\\]"):
        digit_accuracy([1], ["a thick stroke"])


def test_the_metrics_only_count_prompts_that_name_the_attribute():
    images = np.stack([bar(1), bar(6, 0.4)])[:, None]
    metrics = adherence_metrics([7, 7], images, ["a thin seven", "seven leaning right"], ATTRIBUTES)
    assert metrics["prompt_digit_accuracy"] == 1.0
    assert metrics["prompt_thickness_agreement"] == 1.0 and metrics["prompt_slant_agreement"] == 1.0
    assert set(metrics) == {"prompt_digit_accuracy", "prompt_thickness_agreement", "prompt_thickness_chance",
                            "prompt_slant_agreement", "prompt_slant_chance"}
