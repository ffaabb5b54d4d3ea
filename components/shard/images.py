"""Decode, check, normalise and encode one image for the shard step.

Normalisation, in order (documented in the step's README section of ShardConfig too):

1. decode with Pillow, fully (``verify`` then ``load``), applying the EXIF orientation;
2. 16-bit and float images are scaled to 8 bits (16-bit: the high byte);
3. transparency is flattened onto a white background (the convention of img2dataset);
4. convert to ``L`` (channels=1, ITU-R 601 luma) or ``RGB`` (channels=3, grey replicated);
5. resize so the *short* side equals ``image_size`` (bicubic; Pillow's resampling filters widen
   with the scale factor, so downscaling is antialiased), then center-crop the long side to a
   square. An image whose short side already equals ``image_size`` is only cropped, so pixels of
   square inputs of the target size pass through unchanged.

Anything that cannot be decoded raises :class:`BadSample` with a short ``kind`` and a readable reason.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
BACKGROUND = 255  # transparent pixels become white


class BadSample(Exception):
    """An input that is not a usable image. ``kind`` is a stable category for counting."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def decode(data: bytes, name: str = "") -> Image.Image:
    """Bytes of an image file -> a fully loaded PIL image (EXIF orientation applied)."""
    if not data:
        raise BadSample("empty", "zero-byte file")
    looks_like_image = "." + name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # checksums and structure; leaves the image unusable, so reopen
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        if looks_like_image:
            raise BadSample("corrupt", "corrupt image: cannot identify the image format") from None
        raise BadSample("not_image", "not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_large", f"image too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        kind = "truncated" if "truncat" in str(e).lower() else "corrupt"
        raise BadSample(kind, f"{kind} image: {e}") from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is no reason to drop the pixels
        return image


def to_8bit(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image).astype(np.int64)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = np.clip(array, 0, 65535) >> 8
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    image = to_8bit(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Short side to ``size`` (bicubic, antialiased), then the centered ``size`` x ``size`` square."""
    width, height = image.size
    if min(width, height) != size:
        if width <= height:
            new_size = (size, max(size, round(height * size / width)))
        else:
            new_size = (max(size, round(width * size / height)), size)
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        width, height = new_size
    left, top = (width - size) // 2, (height - size) // 2
    if (width, height) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


def prepare(image: Image.Image, channels: int, size: int) -> Image.Image:
    return resize_center_crop(to_channels(image, channels), size)


def encode(image: Image.Image, image_format: str, quality: int = 95) -> bytes:
    """Deterministic bytes: no timestamps or other metadata are written."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif image_format == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unsupported image_format {image_format!r} (png, jpg, webp)")
    return buffer.getvalue()
