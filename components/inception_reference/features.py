"""The inception_reference step's two passes over the training split, and its real-data baseline.

Pass 1 (``reference_subset``) reads only the train split's keys and keeps the chosen ones (a
bounded heap of hashes and keys). Pass 2 (``reference_moments``) streams the split again and sends
the chosen images, a batch at a time, through decode, resize and Inception, into one
``RunningMoments`` per target and the KID reservoir. ``baseline_subset``/``baseline_features``
give the validation images the step scores against the reference for its real-data floor.
See ``components.inception_reference.run`` for what is written and the memory it needs.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from components.common.step import Manifest
from components.evaluate.inception import FEATURE_DIM
from components.evaluate.metrics import RunningMoments
from components.inception_reference.config import ReferenceTarget


def _split_samples(shard: Manifest, split: str, suffixes: tuple[str, ...]) -> Iterator[dict]:
    from components.common.shard_reader import iter_shard_samples

    return iter_shard_samples(shard.storage(), shard.info.get(f"{split}_shards") or [], suffixes)


def _image_key(shard: Manifest) -> str:
    return shard.info.get("image_format", "png")


def _encoded_image(sample: dict, image_key: str) -> bytes:
    if image_key not in sample:
        from components.common.data import ShardDataError

        raise ShardDataError(f"sample {sample['__key__']!r} in {sample['__shard__']} has no {image_key!r} field")
    return sample[image_key]


def hash_rank(key: str, seed: int) -> int:
    """Where ``key`` falls in the seeded random order of the reference choice (lowest first)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def lowest_hash_keys(keys: Iterable[str], count: int, seed: int) -> tuple[list[str], int]:
    """(the ``count`` keys of lowest ``hash_rank``, lowest first; how many keys there were), holding
    only ``count`` of them."""
    kept: list[tuple[int, str]] = []  # a max-heap by rank, as (-rank, key)
    seen = 0
    for seen, key in enumerate(keys, 1):
        rank = hash_rank(key, seed)
        if len(kept) < count:
            heapq.heappush(kept, (-rank, key))
        elif rank < -kept[0][0]:
            heapq.heapreplace(kept, (-rank, key))
    return [key for _, key in sorted((-negative, key) for negative, key in kept)], seen


@dataclass(frozen=True)
class ReferenceSubset:
    """Which training images the reference uses, decided from the keys alone (pass 1)."""

    size: int  # how many are chosen
    keys: frozenset[str] | None  # the chosen keys; None: every training image (nothing to hold)
    kid_keys: tuple[str, ...]  # KID's: the lowest-hash min(kid_count, size) chosen keys, lowest first

    def __contains__(self, key: str) -> bool:
        return self.keys is None or key in self.keys


def reference_subset(shard: Manifest, count: int | None, seed: int, kid_count: int) -> ReferenceSubset:
    """The ``count`` training images (all when None) whose keys hash lowest under ``seed``: a
    uniform random subset whatever the shard order (sources are sharded in listing order, often
    class by class). Reads only the keys, and holds ``count`` of them (``kid_count`` when None)."""
    keys = (sample["__key__"] for sample in _split_samples(shard, "train", ()))  # no payload suffixes
    if count is None:
        kid_keys, size = lowest_hash_keys(keys, kid_count, seed)
        return ReferenceSubset(size=size, keys=None, kid_keys=tuple(kid_keys))
    chosen, _ = lowest_hash_keys(keys, count, seed)
    # the chosen set is the lowest hashes, so KID's lowest-hash share of it is a prefix
    return ReferenceSubset(size=len(chosen), keys=frozenset(chosen), kid_keys=tuple(chosen[:kid_count]))


def decode_batch(encoded: list[tuple[str, bytes]]) -> np.ndarray:
    """uint8 (N, C, H, W) images at the shard's size."""
    from components.common.data import decode_image

    return np.stack([decode_image(data, key) for key, data in encoded])


def resize_to(images: np.ndarray, target: ReferenceTarget) -> np.ndarray:
    """uint8 (N, C, size, size), with the target's filter (as the models' data was resized)."""
    from components.common.resample import resize_uint8

    return resize_uint8(images, target.size, target.filter)


def _batches(items: Iterable, batch_size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def features_at(images: np.ndarray, target: ReferenceTarget, extractor) -> np.ndarray:
    """float32 features of one decoded batch at ``target``'s size: float32 as stored, so that μ/Σ
    and the baseline see what the evaluate step will."""
    return extractor.features(resize_to(images, target)).astype(np.float32)


@dataclass
class TargetReference:
    """One target's reference as pass 2 builds it."""

    moments: RunningMoments
    kid_features: dict[str, np.ndarray]  # key -> float32 (2048,), only the subset's kid_keys

    def kid_matrix(self, kid_keys: tuple[str, ...]) -> np.ndarray:
        """float32 (K, 2048) in hash order, so the file does not depend on the shard order."""
        missing = [key for key in kid_keys if key not in self.kid_features]
        if missing:
            raise ValueError(f"inception_reference: KID reference images {missing[:5]} were chosen from the "
                             "keys but not met again in the train split (did the shards change between passes?)")
        return np.stack([self.kid_features[key] for key in kid_keys])


def reference_moments(shard: Manifest, subset: ReferenceSubset, targets: list[ReferenceTarget], extractor,
                      batch_size: int) -> dict[str, TargetReference]:
    """Pass 2: the chosen training images through Inception, ``batch_size`` at a time, into one
    ``TargetReference`` per target. ``extractor``: anything with ``features(uint8 images)``."""
    from components.common.progress import progress_bar

    image_key, kid_keys = _image_key(shard), frozenset(subset.kid_keys)
    references = {t.name: TargetReference(RunningMoments(FEATURE_DIM), {}) for t in targets}
    chosen = ((sample["__key__"], _encoded_image(sample, image_key))
              for sample in _split_samples(shard, "train", (image_key,)) if sample["__key__"] in subset)
    bar = progress_bar(subset.size, "inception reference", unit="img")
    try:
        for batch in _batches(chosen, batch_size):
            images = decode_batch(batch)  # decoded once, resized per target
            for target in targets:
                features = features_at(images, target, extractor)
                reference = references[target.name]
                reference.moments.update(features)
                reference.kid_features.update((key, row) for (key, _), row in zip(batch, features) if key in kid_keys)
            bar.update(len(batch))
    finally:
        bar.close()
    return references


def baseline_subset(shard: Manifest, per_class: int, num_classes: int) -> list[tuple[str, bytes]]:
    """(key, encoded image) of the first ``per_class`` validation images of each class (``per_class``
    in all when unlabelled), class by class, like the evaluate step's samples; holds only those."""
    from components.common.shard_reader import parse_label

    image_key = _image_key(shard)
    by_class: dict[int, list[tuple[str, bytes]]] = {}
    for sample in _split_samples(shard, "val", (image_key, "cls")):
        key = sample["__key__"]
        label = parse_label(sample.get("cls"), key)
        bucket = by_class.setdefault(label if num_classes else 0, [])
        if len(bucket) < per_class:
            bucket.append((key, _encoded_image(sample, image_key)))
    return [item for label in sorted(by_class) for item in by_class[label]]


def baseline_features(encoded: list[tuple[str, bytes]], target: ReferenceTarget, extractor,
                      batch_size: int) -> np.ndarray:
    """float32 (N, 2048) features of the baseline images, decoded a batch at a time."""
    parts = [features_at(decode_batch(batch), target, extractor) for batch in _batches(encoded, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, FEATURE_DIM), np.float32)
