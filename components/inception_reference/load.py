"""Read an inception_reference step's outputs and score images against them.

For each target ("base", "cascade") the step writes ``inception_<target>.safetensors`` holding
``mu``, ``sigma`` (float64: FID's reference statistics) and ``features`` (float32 (K, 2048): KID's
reference), and sums up in ``inception_reference.json``; its manifest's metrics carry the
real-data baselines (``fid_real_baseline``, ``kid_real_baseline``, ``cascade_`` prefixed).
"""

from __future__ import annotations

import numpy as np

from components.common.step import Manifest
from components.evaluate.inception import InceptionFeatures, kernel_inception_distance
from components.evaluate.metrics import frechet_distance_to_samples

SUMMARY = "inception_reference.json"


def reference_file(target: str) -> str:
    return f"inception_{target}.safetensors"


def metric_prefix(target: str) -> str:
    return "" if target == "base" else f"{target}_"


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
