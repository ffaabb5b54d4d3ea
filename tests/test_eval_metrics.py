"""Evaluation metrics against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.evaluate.classifier import build_classifier
from components.evaluate.metrics import (RunningMoments, feature_stats, frechet_distance, frechet_distance_of,
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


def moments_of(batches) -> RunningMoments:
    moments = RunningMoments(batches[0].shape[1])
    for batch in batches:
        moments.update(batch)
    return moments


def test_running_moments_match_numpy_over_uneven_batches_with_a_large_offset():
    rng = np.random.default_rng(5)
    # correlated features on a common offset of 1e4: from raw sums of x xᵀ the covariance is off by 3e-8
    x = rng.normal(size=(503, 7)) @ rng.normal(size=(7, 7)) + 1e4
    batches = np.split(x, [1, 50, 51, 200, 377])  # sizes 1, 49, 1, 149, 177, 126
    moments = moments_of(batches + [x[:0]])  # an empty batch changes nothing
    expected_sigma = np.cov(x, rowvar=False)
    assert moments.count == 503 and moments.mean.dtype == np.float64 and moments.covariance().shape == (7, 7)
    np.testing.assert_allclose(moments.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.covariance(), expected_sigma, rtol=1e-9,
                               atol=1e-9 * np.abs(expected_sigma).max())


def test_running_moments_merge_of_two_halves_is_one_pass():
    rng = np.random.default_rng(6)
    x = rng.normal(3.0, 2.0, size=(301, 5)) + 1e4
    whole = moments_of(np.split(x, [40, 170]))
    first, second = moments_of([x[:130]]), moments_of(np.split(x[130:], [7]))
    first.merge(second)
    assert first.count == whole.count == 301 and second.count == 171  # merge leaves the other one as it was
    np.testing.assert_allclose(first.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(first.covariance(), whole.covariance(), rtol=1e-10,
                               atol=1e-10 * np.abs(whole.covariance()).max())
    empty = RunningMoments(5)
    empty.merge(whole)  # into an empty one: a copy
    np.testing.assert_allclose(empty.covariance(), whole.covariance(), rtol=1e-13)
    with pytest.raises(ValueError, match="dimension 4"):
        whole.merge(RunningMoments(4))


def test_running_moments_need_two_vectors_for_a_covariance_and_the_right_width():
    moments = RunningMoments(3)
    with pytest.raises(ValueError, match="at least 2 feature vectors.*seen 0"):
        moments.covariance()
    moments.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2 feature vectors.*seen 1"):
        moments.covariance()
    with pytest.raises(ValueError, match=r"\(n, 3\) batches, got \(2, 4\)"):
        moments.update(np.ones((2, 4)))


def test_classifier_shapes_and_unknown_preset():
    model = build_classifier("cnn-tiny", in_channels=1, num_classes=10)
    x = torch.randn(5, 1, 32, 32)
    assert model(x).shape == (5, 10) and model.features(x).shape == (5, 32)
    with pytest.raises(ValueError, match="cnn-small"):
        build_classifier("resnet", 1, 10)
