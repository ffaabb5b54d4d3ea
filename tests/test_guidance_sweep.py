"""The evaluate step's classifier-free guidance sweep: the diversity measure against brute force, the
choice of w, and the sweep through the step with a stand-in generator whose guidance trades variety
for class fidelity (as real guidance does), scored by the real judge on real digits."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from components.dit.config import SamplingConfig
from components.evaluate import guidance_sweep as sweep_module
from components.evaluate import run as evaluate_module
from components.evaluate.config import EvaluateConfig, GuidanceSweepConfig
from components.evaluate.guidance_sweep import (GUIDANCE_SWEEP, GUIDANCE_SWEEP_PLOT, best_weight,
                                                mean_pairwise_distance, within_class_diversity)
from components.evaluate.judge import read_split
from test_evaluate import QUICK_CLASSIFIER, digit_shards, make_ctx, sqlite_tracker  # noqa: F401 (a fixture)


def test_mean_pairwise_distance_is_the_brute_force_mean():
    features = np.random.default_rng(0).normal(size=(7, 5))
    brute = np.mean([np.linalg.norm(a - b) for a, b in itertools.combinations(features, 2)])
    assert mean_pairwise_distance(features) == pytest.approx(brute, rel=1e-9)
    assert math.isnan(mean_pairwise_distance(features[:1]))
    assert mean_pairwise_distance(np.repeat(features[:1], 4, axis=0)) == pytest.approx(0.0, abs=1e-6)


def test_within_class_diversity_averages_the_classes_and_ignores_singletons():
    features = np.array([[0.0], [2.0], [10.0], [10.0], [5.0]])
    labels = np.array([0, 0, 1, 1, 2])  # class 2 has one sample: no pair
    assert within_class_diversity(features, labels) == pytest.approx((2.0 + 0.0) / 2)


def test_the_chosen_weight_is_the_lowest_distance_above_the_accuracy_floor():
    rows = [{"guidance": 0.0, "sample_accuracy": 0.80, "frechet_distance": 1.0},
            {"guidance": 1.0, "sample_accuracy": 0.97, "frechet_distance": 2.0},
            {"guidance": 2.0, "sample_accuracy": 0.99, "frechet_distance": 3.0}]
    assert best_weight(rows, 0.97) == 1.0
    assert best_weight(rows, 0.995) != best_weight(rows, 0.995)  # NaN: none reaches it
    with pytest.raises(ValueError, match=">= 0"):
        GuidanceSweepConfig(weights=[-1.0])
    assert "guidance_sweep" not in EvaluateConfig().cache_relevant()  # existing configs keep their keys


@pytest.mark.integration
def test_the_sweep_scores_each_weight_and_picks_one(digit_shards, tmp_path, monkeypatch):  # noqa: F811
    train_x, train_y = read_split(digit_shards, "train")
    pools = {k: np.flatnonzero(train_y == k) for k in range(10)}
    rng = np.random.default_rng(0)
    drawn_with = []

    def guided_stand_in(dit, dit_meta, ae, ae_meta, labels, sampling, batch_size=256, **kwargs):
        """w = 0: a random class's digit (a quarter of the time the requested one); w > 0: the requested
        class, from a pool that shrinks as w grows (less variety, as guidance gives)."""
        drawn_with.append(sampling.guidance)
        picks = []
        for i, k in enumerate(labels.tolist()):
            if sampling.guidance == 0 and rng.random() > 0.25:
                k = int(rng.integers(10))
            pool = pools[k][: max(1, int(len(pools[k]) / (1 + 8 * sampling.guidance)))]
            picks.append(pool[i % len(pool)])
        return torch.from_numpy(train_x[picks])

    monkeypatch.setattr("components.dit.generate.generate", guided_stand_in)
    monkeypatch.setattr("components.dit.load.load_dit", lambda *a, **k: (None, {}))
    monkeypatch.setattr("components.autoencoder.load.load_autoencoder", lambda *a, **k: (None, {}))
    monkeypatch.setattr(evaluate_module, "dit_takes_text", lambda inputs: False)
    monkeypatch.setattr(evaluate_module, "generate_samples",
                        lambda inputs, labels, *a, **k: torch.from_numpy(train_x[[pools[int(k)][0] for k in labels]]))
    ctx = make_ctx(tmp_path, "evaluate", sqlite_tracker(tmp_path))
    cfg = EvaluateConfig(classifier=QUICK_CLASSIFIER, samples_per_class=4, sample=SamplingConfig(steps=3, seed=7),
                         batch_size=64, guidance_sweep={"weights": [0.0, 1.0, 4.0], "samples_per_class": 12,
                                                        "min_accuracy": 0.9})
    out = evaluate_module.run(cfg, {"shard": digit_shards, "autoencoder": None, "dit": "a stand-in"}, ctx)

    m = out.metrics
    assert drawn_with == [0.0, 1.0, 4.0]
    assert m["guidance_w0_sample_accuracy"] < 0.5 < 0.9 <= m["guidance_w1_sample_accuracy"]
    assert m["guidance_w4_diversity_ratio"] < m["guidance_w1_diversity_ratio"]  # guidance narrows each class
    assert 0.5 < m["guidance_w1_diversity_ratio"] < 1.5  # most of a class's real pool: about as varied as real
    chosen = min((w for w in (1.0, 4.0) if m[f"guidance_w{w:g}_sample_accuracy"] >= 0.9),
                 key=lambda w: m[f"guidance_w{w:g}_frechet_distance"])
    assert m["guidance_sweep_best_w"] == chosen
    assert {GUIDANCE_SWEEP, GUIDANCE_SWEEP_PLOT} <= set(out.files)
    written = json.loads(ctx.output.read_text(GUIDANCE_SWEEP))
    assert [row["guidance"] for row in written["rows"]] == [0.0, 1.0, 4.0] and written["best_w"] == chosen
    assert sweep_module.GUIDANCE_SWEEP_PLOT in {a.path for a in ctx.tracker.client.list_artifacts(ctx.tracker.run_id)}
