"""What a step's shards are as training data: split specs of a manifest, and the decoders that turn
a sample's bytes into arrays (run on the stream's decode threads, see ``components.common.stream``).

- ``image_split(shard_manifest, "train")``: the shard step's images (``<key>.png|jpg|webp``,
  ``<key>.cls`` when labelled), under the shard step's ``on_bad_sample`` policy;
- ``latent_split(latents_manifest, "train")``: the latents step's ``<key>.latent.npy`` (+ ``cls``);
- ``ImageDecoder(image_key, size, filter)``: -> ``image`` uint8 (C, H, W), resized to ``size`` with
  the one resampler (``components.common.resample``), ``label`` int64 (-1: unlabelled);
- ``LatentDecoder()``: -> ``latent`` float32 (c, h, w), ``label``.

Captions (``<key>.txt``, issue 17) are opt-in, so a stage that does not ask for them gets exactly
what it got before, from the same shards: ``image_split(m, split, captions=True)`` (or
``latent_split``) makes the ``txt`` file required, and ``ImageDecoder(..., captions=True)`` /
``LatentDecoder(captions=True)`` add ``caption`` (str); the stream batches it as a list of str,
``batch["caption"]``. ``has_captions(manifest)`` says whether a step's shards carry them.

Per-shard sample counts come from the manifest (``<split>_counts``); manifests written before the
counts were recorded are counted once from the shards' headers (local) or downloads (S3).
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import numpy as np

from components.common.sample_reader import ShardDataError, SplitSpec

if TYPE_CHECKING:
    from components.common.step import Manifest

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
LATENT_KEY = "latent.npy"
LABEL_KEY = "cls"
CAPTION_KEY = "txt"
# A frozen text encoder's caption embeddings, stored by the latents step (components.text.stored).
CONTEXT_KEY = "context.npy"
POOLED_KEY = "pooled.npy"

log = logging.getLogger(__name__)

__all__ = ["IMAGE_KEYS", "ImageDecoder", "LatentDecoder", "ShardDataError", "decode_image", "has_captions",
           "image_split", "latent_split", "parse_caption", "parse_label", "split_counts"]


def decode_image(data: bytes, key: str = "") -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W); grayscale stays 1 channel, anything else is RGB."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if image.mode in ("1", "L", "I;16", "I", "F") else "RGB")
            array = np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only
    except Exception as e:  # PIL raises a zoo of types for corrupt data
        raise ShardDataError(f"sample {key!r}: cannot decode image: {e}") from e
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def parse_label(value: bytes | None, key: str) -> int:
    """A ``cls`` field -> int; -1 when the sample has none (unlabelled source)."""
    if value is None:
        return -1
    try:
        return int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ShardDataError(f"sample {key!r}: cls is not an integer: {value[:20]!r}") from e


def parse_caption(value: bytes | None, key: str) -> str:
    """A ``txt`` field -> str (the shard step wrote it as UTF-8; an empty one is the null caption)."""
    if value is None:
        raise ShardDataError(f"sample {key!r}: has no caption ({CAPTION_KEY}) file")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardDataError(f"sample {key!r}: caption is not UTF-8: {e}") from e


class ImageDecoder:
    def __init__(self, image_key: str = "png", size: int | None = None, filter: str = "bicubic",
                 captions: bool = False):
        if image_key not in IMAGE_KEYS:
            raise ValueError(f"image_key must be one of {IMAGE_KEYS}, got {image_key!r}")
        self.image_key, self.size, self.filter, self.captions = image_key, size, filter, captions

    def __call__(self, key: str, data: dict[str, bytes]) -> dict[str, np.ndarray]:
        from components.common.resample import resize_uint8

        image = decode_image(data[self.image_key], key)
        if self.size is not None and image.shape[-1] != self.size:
            image = resize_uint8(image[None], self.size, self.filter)[0]
        decoded = {"image": image, "label": np.int64(parse_label(data.get(LABEL_KEY), key))}
        if self.captions:
            decoded["caption"] = parse_caption(data.get(CAPTION_KEY), key)
        return decoded


class LatentDecoder:
    """``embeddings``: also the stored caption embeddings, ``context`` float32 (L, D) and ``pooled`` (D,)."""

    def __init__(self, captions: bool = False, embeddings: bool = False):
        self.captions, self.embeddings = captions, embeddings

    def __call__(self, key: str, data: dict[str, bytes]) -> dict[str, np.ndarray]:
        try:
            latent = np.load(io.BytesIO(data[LATENT_KEY]), allow_pickle=False).astype(np.float32)
        except (ValueError, OSError) as e:
            raise ShardDataError(f"sample {key!r}: cannot read its latent: {e}") from e
        decoded = {"latent": latent, "label": np.int64(parse_label(data.get(LABEL_KEY), key))}
        if self.captions:
            decoded["caption"] = parse_caption(data.get(CAPTION_KEY), key)
        if self.embeddings:
            for name, field in (("context", CONTEXT_KEY), ("pooled", POOLED_KEY)):
                try:
                    decoded[name] = np.load(io.BytesIO(data[field]), allow_pickle=False).astype(np.float32)
                except (KeyError, ValueError, OSError) as e:
                    raise ShardDataError(f"sample {key!r}: cannot read its stored text embedding {field}: {e}") from e
        return decoded


def split_counts(manifest: "Manifest", split: str) -> list[int]:
    """Samples per shard of one split, from the manifest or (older manifests) from the shards."""
    recorded = manifest.info.get(f"{split}_counts")
    rels = manifest.info.get(f"{split}_shards") or []
    if recorded is not None:
        return [int(c) for c in recorded]
    from components.common.shard_files import ShardFiles

    log.warning("step %s: its manifest records no per-shard counts of %s; counting them from the shards",
                manifest.step, split)
    files = ShardFiles(manifest.storage(), rels)
    try:
        return [len(files.get(i)[1]) for i in range(len(rels))]
    finally:
        files.close()


def bad_sample_policy(manifest: "Manifest") -> str:
    """The shard step's ``on_bad_sample`` ("skip" or "fail"), which steps reading its shards (or
    the latents made of them) follow; "fail" where a manifest does not say."""
    return manifest.info.get("on_bad_sample") or manifest.config.get("on_bad_sample") or "fail"


def shard_digests(manifest: "Manifest", rels: tuple[str, ...]) -> tuple[str, ...]:
    """The sha256 the step recorded for each shard: every read of a shard is checked against it."""
    return tuple(manifest.file(rel).sha256 for rel in rels)


def split_captions(spec: SplitSpec):
    """Every caption of a split (str), in one verified pass over its shards."""
    from components.common.sample_reader import iter_split_fields

    for sample in iter_split_fields(spec, (CAPTION_KEY,)):
        yield sample[CAPTION_KEY].decode("utf-8")  # the shard step wrote only valid UTF-8 (on_bad_caption)


def split_labelled_captions(spec: SplitSpec):
    """(label, caption) of every labelled, captioned sample of a split, in one verified pass."""
    from components.common.sample_reader import iter_split_fields

    for sample in iter_split_fields(spec, (CAPTION_KEY, LABEL_KEY)):
        yield parse_label(sample[LABEL_KEY], "?"), sample[CAPTION_KEY].decode("utf-8")


def has_captions(manifest: "Manifest") -> bool:
    """Whether the step's shards (the shard step's, or the latents made of them) carry ``txt`` captions."""
    return manifest.info.get("captions", "none") != "none"


def required_fields(manifest: "Manifest", main: str, captions: bool) -> tuple[str, ...]:
    if captions and not has_captions(manifest):
        raise ValueError(f"step {manifest.step}: its shards carry no captions (shard.captions is none)")
    return (main, CAPTION_KEY) if captions else (main,)


def image_split(manifest: "Manifest", split: str, captions: bool = False) -> SplitSpec:
    """The shard step's images of one split (and their captions, when asked)."""
    rels = tuple(manifest.info.get(f"{split}_shards") or ())
    fields = required_fields(manifest, manifest.info.get("image_format", "png"), captions)
    return SplitSpec(manifest.output_uri, rels, tuple(split_counts(manifest, split)), fields, (LABEL_KEY,),
                     bad_sample_policy(manifest), f"{manifest.step} {split}", shard_digests(manifest, rels))


def latent_split(manifest: "Manifest", split: str, captions: bool = False, embeddings: bool = False) -> SplitSpec:
    """The latents step's latents of one split (and their captions, their stored text embeddings, when asked)."""
    rels = tuple(manifest.info.get(f"{split}_shards") or ())
    fields = required_fields(manifest, LATENT_KEY, captions)
    if embeddings:
        if "text_encoder" not in manifest.info:
            raise ValueError(f"step {manifest.step}: its shards carry no text embeddings (latents.text_encoder unset)")
        fields += (CONTEXT_KEY, POOLED_KEY)
    return SplitSpec(manifest.output_uri, rels, tuple(split_counts(manifest, split)), fields, (LABEL_KEY,),
                     bad_sample_policy(manifest), f"{manifest.step} {split}", shard_digests(manifest, rels))
