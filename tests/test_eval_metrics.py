"""Evaluation metrics against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.evaluate.classifier import build_classifier
from components.evaluate.metrics import (feature_stats, frechet_distance, frechet_distance_of,
                                         frechet_distance_to_samples)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_agrees_with_the_matrix_square_root_of_the_product():
    from scipy import linalg

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)
    # rank-deficient (fewer samples than dimensions, as FID on small sets): finite, and 0 for equal sets
    few = rng.normal(size=(5, 20))
    assert frechet_distance(*feature_stats(few), *feature_stats(few)) == pytest.approx(0.0, abs=1e-5)


def test_frechet_distance_to_few_samples_takes_the_small_route_exactly():
    rng = np.random.default_rng(4)
    reference = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40))
    mu, sigma = feature_stats(reference)
    for n in (12, 39, 80):  # fewer samples than dimensions (the n x n route), and more (the d x d one)
        samples = rng.normal(size=(n, 40)) @ rng.normal(size=(40, 40)) + 0.5
        assert frechet_distance_to_samples(mu, sigma, samples) == pytest.approx(
            frechet_distance(mu, sigma, *feature_stats(samples)), rel=1e-6)


def test_frechet_distance_of_samples():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    assert frechet_distance_of(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = rng.normal(size=(4000, 4)) + 3.0
    assert frechet_distance_of(a, shifted) == pytest.approx(4 * 9.0, rel=0.05)


def test_feature_stats_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.zeros((1, 3)))


def test_classifier_shapes_and_unknown_preset():
    model = build_classifier("cnn-tiny", in_channels=1, num_classes=10)
    x = torch.randn(5, 1, 32, 32)
    assert model(x).shape == (5, 10) and model.features(x).shape == (5, 32)
    with pytest.raises(ValueError, match="cnn-small"):
        build_classifier("resnet", 1, 10)
