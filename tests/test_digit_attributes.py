"""The digit attributes behind ``shard.captions: attributes`` (components/shard/digit_attributes.py):
measurement on synthetic strokes, the templates and the parser back, and their balance on the
bundled set. Pure numpy, no Ray."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from components.shard.digit_attributes import (DIGIT_WORDS, SLANT_DEAD_ZONE, SLANTS, TEMPLATES, THICKNESS,
                                               DigitAttributes, caption_for, class_tertiles, ink_mass, measure,
                                               parse_caption, render, shear, slant_of, template_index)


def bar(width: int, lean: float = 0.0, size: int = 28) -> np.ndarray:
    """A white vertical stroke ``width`` pixels wide on black, its top shifted ``lean`` pixels right
    per pixel up (negative: left)."""
    image = np.zeros((size, size), np.uint8)
    for row in range(4, size - 4):
        centre = size / 2 + lean * (size / 2 - row)
        left = int(round(centre - width / 2))
        image[row, max(left, 0): max(left + width, 0)] = 255
    return image


def test_shear_sign_and_slant_words_on_slanted_bars():
    assert shear(bar(3, lean=0.4)) > SLANT_DEAD_ZONE  # the top to the right: leaning right
    assert shear(bar(3, lean=-0.4)) < -SLANT_DEAD_ZONE
    assert abs(shear(bar(3))) < 0.02
    assert shear(np.zeros((8, 8))) == 0.0  # an empty image has no slant, and no division by zero
    assert [slant_of(shear(bar(3, lean=x))) for x in (-0.4, 0.0, 0.4)] == ["left", "upright", "right"]
    assert slant_of(SLANT_DEAD_ZONE) == "upright" and slant_of(-SLANT_DEAD_ZONE - 1e-9) == "left"


def test_thickness_against_the_class_tertiles_of_ink_mass():
    widths = [1, 1, 2, 3, 3, 4, 5, 6, 6]
    images = np.stack([bar(w) for w in widths])
    tertiles = class_tertiles(images, np.full(len(widths), 7))
    assert list(tertiles) == ["7"] and tertiles["7"][0] < tertiles["7"][1]
    assert ink_mass(bar(2)) < ink_mass(bar(5))
    assert measure(bar(1), 7, tertiles) == DigitAttributes(7, "thin", "upright")
    assert measure(bar(6, lean=0.4), 7, tertiles) == DigitAttributes(7, "thick", "right")
    assert measure(bar(3, lean=-0.4), 7, tertiles).thickness == "regular"
    # (1, H, W) and (H, W, 1) measure as (H, W): the shard image and a generated sample alike
    assert measure(bar(6)[None], 7, tertiles) == measure(bar(6)[..., None], 7, tertiles)
    with pytest.raises(ValueError, match="no ink tertiles for digit 3"):
        measure(bar(3), 3, tertiles)


def test_every_template_parses_back_to_its_attributes():
    texts = set()
    for template, digit, thickness, slant in itertools.product(range(len(TEMPLATES)), range(10), THICKNESS, SLANTS):
        attributes = DigitAttributes(digit, thickness, slant)
        text = render(attributes, template)
        texts.add(text)
        assert parse_caption(text) == attributes, text
    assert len(texts) == len(TEMPLATES) * 10 * 3 * 3  # no two attribute sets share a caption


def test_captions_vary_by_key_deterministically():
    attributes = DigitAttributes(7, "thick", "right")
    captions = {caption_for(f"mnist-{i:05d}", attributes) for i in range(200)}
    assert len(captions) == len(TEMPLATES)
    assert caption_for("mnist-00042", attributes) == caption_for("mnist-00042", attributes)
    assert {template_index(f"k{i}") for i in range(200)} == set(range(len(TEMPLATES)))
    assert render(attributes, 0) == "a thick seven leaning right"
    assert render(DigitAttributes(7, "thin", "upright"), 1) == "7, thin, upright"


def test_parse_free_form_prompts():
    assert parse_caption("A THICK Seven, leaning right!") == DigitAttributes(7, "thick", "right")
    assert parse_caption("an upright 3") == DigitAttributes(3, None, "upright")  # upright is not right
    assert parse_caption("something else") == DigitAttributes(None, None, None)
    assert parse_caption("12 thin") == DigitAttributes(None, "thin", None)  # 12 is no digit
    with pytest.raises(ValueError, match="every attribute"):
        render(DigitAttributes(None, "thin", "left"), 0)


def test_attributes_on_the_bundled_set():
    """Thickness is balanced by construction (tertiles per class); slant is what the set shows,
    mostly right-leaning, but every class has every slant (counts in the README)."""
    from components.shard.sources import mnist_arrays

    pixels, labels = mnist_arrays()
    tertiles = class_tertiles(pixels, labels)
    measured = [measure(image, int(label), tertiles) for image, label in zip(pixels, labels)]
    for digit in range(10):
        mine = [m for m, label in zip(measured, labels) if label == digit]
        thick = {word: sum(m.thickness == word for m in mine) for word in THICKNESS}
        assert all(abs(n - len(mine) / 3) <= 2 for n in thick.values()), (digit, thick)
        slants = {word: sum(m.slant == word for m in mine) for word in SLANTS}
        assert min(slants.values()) >= 0.03 * len(mine), (digit, slants)  # the fewest: 19 left-leaning zeros
    total = {word: sum(m.slant == word for m in measured) for word in SLANTS}
    assert total == {"left": 963, "upright": 1297, "right": 2740}
    assert DIGIT_WORDS[7] == "seven"
