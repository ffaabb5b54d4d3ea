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

import json
import logging
import math

import numpy as np
import torch

from components.common.step import Manifest, StepContext, StepOutput
from components.evaluate.inception import WEIGHTS_SHA1, InceptionFeatures
from components.inception_reference.config import InceptionReferenceConfig, ReferenceTarget
from components.inception_reference.features import (ReferenceSubset, TargetReference, baseline_features,
                                                     baseline_subset, reference_moments, reference_subset)
from components.inception_reference.load import SUMMARY, metric_prefix, reference_file, score_against

# The step's cache key holds its name, this version and its config, not its module path: the move
# from components/evaluate/reference.py kept all three, so cached references stay valid.
CODE_VERSION = "2"  # 2: μ/Σ streamed over the whole reference; features only of the KID reservoir

log = logging.getLogger(__name__)


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
