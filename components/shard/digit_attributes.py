"""Attributes measured on a digit image, the captions made of them, and the parser back.

The shard step writes these captions for ``builtin:mnist`` under ``shard.captions: attributes``;
the evaluate step measures generated samples with the same functions and the same per-class
thresholds (recorded in the shard manifest's ``info["caption_attributes"]``), so a sample can be
checked against its prompt's words, not only its class. numpy only: no torch, no I/O.

The measurement, on a grey image whose ink is bright (MNIST: white strokes on black, 0..255):

- **ink mass**: the mean intensity / 255, i.e. the fraction of the image the ink would cover at
  full intensity. It is a mean, not a sum, so a resized image (28 -> 32 pixels) measures about the
  same. **Thickness** compares it with the ink mass of the same digit over the bundled set: below
  the class's first tertile is ``thin``, above its second ``thick``, else ``regular``. The
  tertiles are per class because a one has far less ink than an eight at any stroke width.
- **shear**: with the intensity-weighted centroid and the central second-order moments
  mu11 = sum (x - cx)(y - cy) I and mu02 = sum (y - cy)^2 I (x right, y down), the shear
  -mu11 / mu02 is how many pixels the ink moves right per pixel up: the tangent of the slant
  from the vertical (the moment-based deskewing of LeCun et al.'s MNIST work, sign flipped so that
  positive leans right). **Slant**: within +-SLANT_DEAD_ZONE (0.1, about 5.7 degrees) the digit is
  ``upright``, beyond it ``right`` or ``left``. The dead zone is fixed, not fitted: it names what
  the image shows, so the bundled set, which leans right, is not balanced in slant (the README
  gives the counts).

Captions vary their template by a hash of the sample key (``caption_for``), so the same key always
gets the same text. ``parse_caption`` reads any of them (and free-form prompts using the same words)
back to (digit, thickness, slant), None for what the text does not say.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

THICKNESS = ("thin", "regular", "thick")
SLANTS = ("left", "upright", "right")
SLANT_DEAD_ZONE = 0.1  # |shear| at most this is upright: tan(5.7 degrees)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SLANT_PHRASES = {"left": "leaning left", "upright": "standing upright", "right": "leaning right"}
SLANT_SHORT = {"left": "slanted left", "upright": "upright", "right": "slanted right"}
TEMPLATES = (
    "a {thickness} {word} {slant_phrase}",
    "{digit}, {thickness}, {slant_short}",
    "the digit {word}, {thickness} stroke, {slant_short}",
    "a handwritten {digit} in {thickness} ink, {slant_phrase}",
    "{slant_short} {thickness} {word}",
)
TOKEN = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class DigitAttributes:
    digit: int | None
    thickness: str | None
    slant: str | None


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W), (1, H, W) or (H, W, 1) -> float64 (H, W)."""
    array = np.asarray(image, dtype=np.float64)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"expected one grey image (H, W), got shape {np.shape(image)}")
    return array


def ink_mass(image: np.ndarray) -> float:
    """Mean intensity / 255: the share of the image covered by ink."""
    return float(_grey(image).mean() / 255.0)


def shear(image: np.ndarray) -> float:
    """-mu11 / mu02: positive leans right (the top of the stroke to the right); 0 for an empty image."""
    grey = _grey(image)
    mass = grey.sum()
    if mass <= 0:
        return 0.0
    ys, xs = np.mgrid[0 : grey.shape[0], 0 : grey.shape[1]]
    dx = xs - (grey * xs).sum() / mass
    dy = ys - (grey * ys).sum() / mass
    mu02 = (grey * dy * dy).sum()
    return float(-(grey * dx * dy).sum() / mu02) if mu02 > 0 else 0.0


def slant_of(shear_value: float, dead_zone: float = SLANT_DEAD_ZONE) -> str:
    if shear_value > dead_zone:
        return "right"
    if shear_value < -dead_zone:
        return "left"
    return "upright"


def class_tertiles(images: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """{class as str: [first tertile, second tertile]} of the ink mass of each class's images."""
    masses = np.asarray(images, dtype=np.float64).reshape(len(images), -1).mean(axis=1) / 255.0
    labels = np.asarray(labels)
    return {str(int(c)): [float(q) for q in np.quantile(masses[labels == c], [1 / 3, 2 / 3])]
            for c in np.unique(labels)}


def thickness_of(mass: float, tertiles: list[float]) -> str:
    low, high = tertiles
    if mass < low:
        return "thin"
    if mass > high:
        return "thick"
    return "regular"


def measure(image: np.ndarray, digit: int, tertiles: dict[str, list[float]],
            dead_zone: float = SLANT_DEAD_ZONE) -> DigitAttributes:
    """The attributes of one image of ``digit`` against that class's ink tertiles."""
    if str(digit) not in tertiles:
        raise ValueError(f"no ink tertiles for digit {digit} (have {sorted(tertiles)})")
    return DigitAttributes(digit, thickness_of(ink_mass(image), tertiles[str(digit)]),
                           slant_of(shear(image), dead_zone))


def template_index(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % len(TEMPLATES)


def render(attributes: DigitAttributes, template: int) -> str:
    if None in (attributes.digit, attributes.thickness, attributes.slant):
        raise ValueError(f"a caption needs every attribute, got {attributes}")
    return TEMPLATES[template].format(
        digit=attributes.digit, word=DIGIT_WORDS[attributes.digit], thickness=attributes.thickness,
        slant_phrase=SLANT_PHRASES[attributes.slant], slant_short=SLANT_SHORT[attributes.slant])


def caption_for(key: str, attributes: DigitAttributes) -> str:
    """The caption of sample ``key``: its attributes in the template its key picks."""
    return render(attributes, template_index(key))


def parse_caption(text: str) -> DigitAttributes:
    """Caption or prompt text -> the attributes it names (None for those it does not name).
    ``upright`` is a word of its own, so it never reads as ``right``."""
    tokens = TOKEN.findall(text.lower())
    digit = next((DIGIT_WORDS.index(t) if t in DIGIT_WORDS else int(t) for t in tokens
                  if t in DIGIT_WORDS or (t.isdigit() and len(t) == 1)), None)
    thickness = next((t for t in tokens if t in THICKNESS), None)
    slant = next(({"left": "left", "right": "right", "upright": "upright"}[t] for t in tokens
                  if t in ("left", "right", "upright")), None)
    return DigitAttributes(digit, thickness, slant)
