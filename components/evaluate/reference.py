"""Inception reference step: the real images' Inception features, computed once per dataset version.

Its inputs are only the shard step, so its cache key changes exactly when the data does (or the
reference settings); every evaluate run on the same data reuses it. For each target resolution
(the base, and the cascade's final size) it writes ``inception_<target>.safetensors`` with

- ``features``: float32 (N, 2048) pool features of ``reference_samples`` training images (a seeded
  random subset; all of them when None), brought to the target size as the models' data was;
- ``mu``, ``sigma``: float64 mean and covariance of those features, FID's reference statistics;

and measures the real-data floor the evaluate step's numbers should be read against: FID and KID
of ``samples_per_class`` *validation* images per class (as many as the evaluate step scores)
against the reference (``fid_real_baseline``, ``kid_real_baseline``; ``cascade_`` prefixed for the
cascade target). ``inception_reference.json`` sums it up.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math

import numpy as np
import torch

from components.common.step import Manifest, StepContext, StepOutput
from components.evaluate.config import InceptionReferenceConfig, ReferenceTarget
from components.evaluate.inception import WEIGHTS_SHA1, InceptionFeatures, kernel_inception_distance
from components.evaluate.metrics import feature_stats, frechet_distance_to_samples

CODE_VERSION = "1"
SUMMARY = "inception_reference.json"

log = logging.getLogger(__name__)


def reference_file(target: str) -> str:
    return f"inception_{target}.safetensors"


def metric_prefix(target: str) -> str:
    return "" if target == "base" else f"{target}_"


def _split_samples(shard: Manifest, split: str):
    """(key, label, encoded image) of every sample of one split, streamed shard by shard."""
    from components.common.shard_reader import iter_shard_samples, parse_label

    image_key = shard.info.get("image_format", "png")
    for sample in iter_shard_samples(shard.storage(), shard.info.get(f"{split}_shards") or [], (image_key, "cls")):
        yield sample["__key__"], parse_label(sample.get("cls"), sample["__key__"]), sample[image_key]


def decode_at(encoded: list[tuple[str, bytes]], target: ReferenceTarget) -> np.ndarray:
    """uint8 (N, C, size, size) images, resized with the target's filter."""
    from components.common.data import decode_image
    from components.common.resample import resize_uint8

    if not encoded:
        return np.zeros((0, 1, target.size, target.size), np.uint8)
    return resize_uint8(np.stack([decode_image(data, key) for key, data in encoded]), target.size, target.filter)


def reference_subset(shard: Manifest, count: int | None, seed: int) -> list[tuple[str, bytes]]:
    """(key, encoded image) of ``count`` training images (all when None): the ones whose keys hash
    lowest under ``seed``, a uniform random subset whatever the shard order (sources are sharded
    in listing order, often class by class). Streamed, holding only the kept (still encoded)
    images, so this scales to ImageNet-sized splits."""
    kept: list[tuple[int, str, bytes]] = []  # a max-heap by hash, as (-hash, key, bytes)
    for key, _, data in _split_samples(shard, "train"):
        rank = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
        if count is None or len(kept) < count:
            heapq.heappush(kept, (-rank, key, data))
        elif rank < -kept[0][0]:
            heapq.heapreplace(kept, (-rank, key, data))
    return [(key, data) for _, key, data in sorted(kept, key=lambda item: item[1])]


def baseline_subset(shard: Manifest, per_class: int, num_classes: int) -> list[tuple[str, bytes]]:
    """The first ``per_class`` validation images of each class (``per_class`` in all when unlabelled),
    class by class, like the evaluate step's samples."""
    by_class: dict[int, list[tuple[str, bytes]]] = {}
    for key, label, data in _split_samples(shard, "val"):
        bucket = by_class.setdefault(label if num_classes else 0, [])
        if len(bucket) < per_class:
            bucket.append((key, data))
    return [item for label in sorted(by_class) for item in by_class[label]]


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
    from safetensors.numpy import save

    torch.set_num_threads(max(1, math.ceil(ctx.resources.num_cpus)))
    device = "cuda" if ctx.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    shard = inputs["shard"]
    num_classes = len(shard.info.get("classes") or [])
    extractor = InceptionFeatures(device, cfg.batch_size)
    metrics, summary, files = {}, {"weights_sha1": WEIGHTS_SHA1, "weights": str(extractor.path), "targets": {}}, []
    reference_encoded = reference_subset(shard, cfg.reference_samples, cfg.seed)
    if len(reference_encoded) < 2:
        raise ValueError(f"inception_reference needs at least 2 training images; the shard step "
                         f"({shard.location}) has {len(reference_encoded)}")
    baseline_encoded = baseline_subset(shard, cfg.samples_per_class, num_classes)
    for target in cfg.targets:
        train_x = decode_at(reference_encoded, target)
        features = extractor.features(train_x, f"inception reference, {target.name} at {target.size} px")
        features = features.astype(np.float32)  # as stored, so the baseline sees what evaluate will
        mu, sigma = feature_stats(features)
        reference = {"features": features.astype(np.float64), "mu": mu, "sigma": sigma}
        ctx.output.write_bytes(reference_file(target.name), save(
            {"features": features, "mu": mu, "sigma": sigma},
            metadata={"size": str(target.size), "filter": target.filter, "count": str(len(train_x))}))
        files.append(reference_file(target.name))

        val_x = decode_at(baseline_encoded, target)
        details = {"size": target.size, "filter": target.filter, "reference_split": "train",
                   "reference_count": len(train_x), "baseline_split": "val", "baseline_count": len(val_x)}
        if len(val_x) >= 2:
            scores = score_against(reference, extractor.features(val_x, "inception real baseline"), cfg)
            prefix = metric_prefix(target.name)
            metrics[f"{prefix}fid_real_baseline"] = scores["fid"]
            metrics[f"{prefix}kid_real_baseline"] = scores["kid"]
            details["baseline"] = scores
        summary["targets"][target.name] = details
        log.info("inception_reference: %s at %d px, %d reference images; real baseline %s", target.name,
                 target.size, len(train_x), details.get("baseline"))
    ctx.output.write_text(SUMMARY, json.dumps(summary, indent=2, sort_keys=True))
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_dict(summary, SUMMARY)
    return StepOutput(files=files + [SUMMARY], metrics=metrics,
                      info={"targets": [t.model_dump() for t in cfg.targets], "weights_sha1": WEIGHTS_SHA1})
