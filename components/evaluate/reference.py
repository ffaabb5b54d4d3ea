"""Inception reference step: the real images' Inception features, computed once per dataset version.

Its inputs are only the shard step, so its cache key changes exactly when the data does (or the
reference settings); every evaluate run on the same data reuses it. For each target resolution
(the base, and the cascade's final size) it writes ``inception_<target>.safetensors`` with

- ``mu``, ``sigma``: float64 mean and covariance of the pool features of ``reference_samples``
  training images (a seeded random subset: the lowest hashes of ``seed:key``; all of them when
  None), brought to the target size as the models' data was: FID's reference statistics;
- ``features``: float32 (K, 2048) features of the ``kid_reference_samples`` lowest-hash images of
  that subset (K = min(kid_reference_samples, reference count)), in hash order, for KID; a uniform
  subset too, since the hash order is random;

and measures the real-data floor the evaluate step's numbers should be read against: FID and KID
of ``samples_per_class`` *validation* images per class (as many as the evaluate step scores)
against the reference (``fid_real_baseline``, ``kid_real_baseline``; ``cascade_`` prefixed for the
cascade target). ``inception_reference.json`` sums it up, both counts included.

Nothing holds the training split, nor the chosen images. Pass 1 reads only the train split's keys
and keeps the chosen ones (a bounded heap of hashes and keys). Pass 2 streams the split again and
sends the chosen images, a batch of ``batch_size`` at a time, through decode, resize and Inception,
into one ``RunningMoments`` per target (μ and Σ by Chan et al.'s parallel update) and the KID
reservoir. The baseline holds its ``samples_per_class × classes`` validation images encoded and
decodes them a batch at a time. Memory per worker, beside the network and the chosen keys
(``reference_samples`` strings), whatever the size of the split:

    batch_size images (decoded at the shard's size and at one target's)
    + targets × 2048² float64 (the centred second moment: 32 MB each, two more during an update)
    + targets × kid_reference_samples × 2048 float32 (the KID reservoir: 80 MB at 10,000)
    + samples_per_class × classes encoded images and their 2048 float32 features (the baseline)
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from components.common.step import Manifest, StepContext, StepOutput
from components.evaluate.config import InceptionReferenceConfig, ReferenceTarget
from components.evaluate.inception import (FEATURE_DIM, WEIGHTS_SHA1, InceptionFeatures,
                                           kernel_inception_distance)
from components.evaluate.metrics import RunningMoments, frechet_distance_to_samples

CODE_VERSION = "2"  # 2: μ/Σ streamed over the whole reference; features only of the KID reservoir
SUMMARY = "inception_reference.json"

log = logging.getLogger(__name__)


def reference_file(target: str) -> str:
    return f"inception_{target}.safetensors"


def metric_prefix(target: str) -> str:
    return "" if target == "base" else f"{target}_"


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


def load_reference(manifest: Manifest, target: str) -> dict[str, np.ndarray]:
    """``features``, ``mu``, ``sigma`` of one target, as float64 arrays."""
    from safetensors.numpy import load

    arrays = load(manifest.storage().read_bytes(reference_file(target)))
    return {k: v.astype(np.float64) for k, v in arrays.items()}


def score_against(reference: dict[str, np.ndarray], features: np.ndarray, cfg) -> dict[str, float]:
    """{"fid", "kid", "kid_std"} of ``features`` against a reference from ``load_reference``.
    ``cfg``: anything with ``kid_subsets``, ``kid_subset_size`` and ``seed``."""
    fid = frechet_distance_to_samples(reference["mu"], reference["sigma"], features)
    kid, kid_std = kernel_inception_distance(reference["features"], features, cfg.kid_subsets,
                                             cfg.kid_subset_size, cfg.seed)
    return {"fid": fid, "kid": kid, "kid_std": kid_std}


class InceptionScorer:
    """``scorer(target, images)`` -> {fid, kid, kid_std, fid_real_baseline, kid_real_baseline} of
    uint8 images against one target ("base", "cascade") of an inception_reference step; the
    baselines are copied from that step so that the numbers are read side by side."""

    def __init__(self, reference: Manifest, cfg, device: str = "cpu"):
        self.reference, self.cfg = reference, cfg  # cfg: evaluate.inception
        self.targets = [t["name"] for t in reference.info.get("targets", [])]
        self.extractor = InceptionFeatures(device, cfg.batch_size)

    def __call__(self, target: str, images) -> dict[str, float]:
        features = self.extractor.features(images, f"inception features, {target} samples")
        scores = score_against(load_reference(self.reference, target), features, self.cfg)
        for name in ("fid_real_baseline", "kid_real_baseline"):
            if metric_prefix(target) + name in self.reference.metrics:
                scores[name] = self.reference.metrics[metric_prefix(target) + name]
        return scores


def run(cfg: InceptionReferenceConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    torch.set_num_threads(max(1, math.ceil(ctx.resources.num_cpus)))
    device = "cuda" if ctx.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    shard = inputs["shard"]
    num_classes = len(shard.info.get("classes") or [])
    extractor = InceptionFeatures(device, cfg.batch_size)
    metrics, summary, files = {}, {"weights_sha1": WEIGHTS_SHA1, "weights": str(extractor.path), "targets": {}}, []
    subset = reference_subset(shard, cfg.reference_samples, cfg.seed, cfg.kid_reference_samples)
    if subset.size < 2:  # before pass 2, which is the expensive one
        raise ValueError(f"inception_reference needs at least 2 training images; the shard step "
                         f"({shard.output_uri}) has {subset.size}")
    references = reference_moments(shard, subset, cfg.targets, extractor, cfg.batch_size)
    baseline_encoded = baseline_subset(shard, cfg.samples_per_class, num_classes)
    for target in cfg.targets:
        reference = _write_reference(ctx, target, references[target.name], subset)
        files.append(reference_file(target.name))
        details = {"size": target.size, "filter": target.filter, "reference_split": "train",
                   "reference_count": references[target.name].moments.count,
                   "kid_reference_count": len(reference["features"]),
                   "baseline_split": "val", "baseline_count": len(baseline_encoded)}
        if len(baseline_encoded) >= 2:
            val_features = baseline_features(baseline_encoded, target, extractor, cfg.batch_size)
            scores = score_against(reference, val_features, cfg)
            prefix = metric_prefix(target.name)
            metrics[f"{prefix}fid_real_baseline"] = scores["fid"]
            metrics[f"{prefix}kid_real_baseline"] = scores["kid"]
            details["baseline"] = scores
        summary["targets"][target.name] = details
        log.info("inception_reference: %s at %d px, %d reference images (%d for KID); real baseline %s",
                 target.name, target.size, details["reference_count"], details["kid_reference_count"],
                 details.get("baseline"))
    ctx.output.write_text(SUMMARY, json.dumps(summary, indent=2, sort_keys=True))
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_dict(summary, SUMMARY)
    return StepOutput(files=files + [SUMMARY], metrics=metrics,
                      info={"targets": [t.model_dump() for t in cfg.targets], "weights_sha1": WEIGHTS_SHA1})


def _write_reference(ctx: StepContext, target: ReferenceTarget, reference: TargetReference,
                     subset: ReferenceSubset) -> dict[str, np.ndarray]:
    """Writes ``inception_<target>.safetensors``; returns it as ``load_reference`` would read it."""
    from safetensors.numpy import save

    kid_features = reference.kid_matrix(subset.kid_keys)
    mu, sigma = reference.moments.mean, reference.moments.covariance()
    metadata = {"size": str(target.size), "filter": target.filter, "count": str(reference.moments.count),
                "kid_count": str(len(kid_features))}
    ctx.output.write_bytes(reference_file(target.name), save(
        {"features": kid_features, "mu": mu, "sigma": sigma}, metadata=metadata))
    return {"features": kid_features.astype(np.float64), "mu": mu, "sigma": sigma}
