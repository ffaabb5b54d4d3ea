"""Streaming webdataset shards into Ray Train workers.

Driver side, ``shard_dataset(urls)`` builds a Ray Dataset with exactly two columns:

- ``image``: uint8, (C, H, W), as stored in the shard (PNG/JPEG/WebP decoded; 1 channel for
  grayscale, 3 otherwise). uint8 keeps the object store 4x smaller than float32;
- ``label``: int64, the sample's ``cls`` (-1 where a sample has none).

Worker side, ``iter_batches("train", batch_size, seed, epoch)`` yields this worker's batches as
torch tensors, ``image`` converted to float32 in [-1, 1]. Every worker gets the same number of
batches in every epoch: Train's ``DataConfig`` splits datasets with ``streaming_split(equal=True)``
(equal row counts) and we drop the last partial batch, so no worker waits at the end of an epoch
for a collective that the others never reach.

Determinism: with a seed, shard files are shuffled once, in the same order for every epoch, and
each worker shuffles rows in a local buffer seeded by (seed, epoch, rank): epochs differ, and a
resumed run sees the same order as an uninterrupted one, so skipping the batches consumed before
the interruption skips the right ones. The buffer mixes only nearby rows; shards should be
written shuffled (the shard step does) and the buffer made larger for stronger mixing. The output splitter assigns
blocks to workers greedily by row count in arrival order, so the order is reproducible only when
Ray Data preserves block order: pass ``ingest_config()`` as the trainer's ``dataset_config``
(``fit`` does). On one node the same seed then gives every worker the same batches in the same
order; across nodes, locality hints may move blocks between workers.

CPU budget: Ray Data's read/decode tasks need CPUs that Train workers have not reserved. On a
2-CPU Ray, two workers of 1 CPU each starve the reader and ``fit`` never returns; give workers
fractional CPUs (``cpus_per_worker: 0.5``) or leave at least one CPU free.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.data
    import torch

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class ShardDataError(ValueError):
    """A shard's contents cannot be turned into training batches; the message names the sample."""


# ---------------------------------------------------------------- file systems


def s3_filesystem() -> "pyarrow.fs.S3FileSystem":
    """A pyarrow S3 file system from the standard AWS environment. ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` selects an S3-compatible server (MinIO, moto), as boto3 does."""
    from pyarrow import fs

    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/") if sep else endpoint
        kwargs["scheme"] = scheme if sep else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)


def arrow_filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem | None", str]:
    """(file system, path inside it) for a local path or s3:// URI; None means "local, let the
    library decide". Ray Data and Ray Train both take this pair."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme: {uri!r} (use a local path or s3://)")
    return None, os.path.abspath(uri.removeprefix("file://"))


# ---------------------------------------------------------------- driver side


def decode_image(data: bytes, key: str = "") -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W); grayscale stays 1 channel, anything else is RGB."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if image.mode in ("1", "L", "I;16", "I", "F") else "RGB")
            array = np.asarray(image, dtype=np.uint8)
    except Exception as e:  # PIL raises a zoo of types for corrupt data
        raise ShardDataError(f"sample {key!r}: cannot decode image: {e}") from e
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _label(value, key: str) -> int:
    if value is None:
        return -1
    try:
        return int(value.decode() if isinstance(value, (bytes, bytearray)) else value)
    except ValueError as e:
        raise ShardDataError(f"sample {key!r}: cls is not an integer: {value!r}") from e


class DecodeSamples:
    """map_batches function: raw webdataset columns -> ``image`` (uint8 NCHW), ``label`` (int64).
    Only these two tensor columns leave it: string columns (``__key__``, ``__url__``, ``json``)
    break ``iter_torch_batches``."""

    def __init__(self, image_key: str, label_key: str | None):
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["__key__"]
        if self.image_key not in batch:
            raise ShardDataError(f"samples have no {self.image_key!r} field (e.g. {keys[0]!r})")
        images = []
        for key, data in zip(keys, batch[self.image_key]):
            if data is None:
                raise ShardDataError(f"sample {key!r} has no {self.image_key!r} field")
            images.append(decode_image(data, key))
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            raise ShardDataError(f"images of different shapes in one batch: {sorted(shapes)} "
                                 f"(the shard step writes one size; got e.g. {keys[0]!r})")
        raw_labels = batch.get(self.label_key) if self.label_key else None
        labels = [-1] * len(keys) if raw_labels is None else [_label(v, k) for k, v in zip(keys, raw_labels)]
        return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.int64)}


def shard_dataset(urls: list[str] | str, image_key: str = "png", label_key: str | None = "cls",
                  shuffle_seed: int | None = None) -> "ray.data.Dataset":
    """A Ray Dataset over webdataset shards: columns ``image`` (uint8 CHW) and ``label`` (int64).

    ``urls``: shard files or directories, all local or all on S3 (s3://bucket/key).
    ``shuffle_seed``: shuffle the order of shard files with this seed (rows are shuffled later,
    per worker and epoch, by ``iter_batches``); None keeps the given order."""
    import ray.data
    from ray.data import FileShuffleConfig

    if image_key not in IMAGE_KEYS:
        raise ValueError(f"image_key must be one of {IMAGE_KEYS}, got {image_key!r}")
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("shard_dataset needs at least one shard URL")
    schemes = {u.startswith("s3://") for u in urls}
    if len(schemes) > 1:
        raise ValueError("shard URLs mix local paths and s3:// URIs; use one kind per dataset")
    pairs = [arrow_filesystem(u) for u in urls]
    filesystem, paths = pairs[0][0], [path for _, path in pairs]
    suffixes = [image_key] + ([label_key] if label_key else [])
    ds = ray.data.read_webdataset(
        paths, filesystem=filesystem, decoder=None, suffixes=suffixes,
        # One file order for every epoch: epochs differ through the seeded local shuffle, and a
        # resumed run (whose execution count restarts at 0) sees the same order as the original.
        shuffle=(FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
                 if shuffle_seed is not None else None),
    )
    return ds.map_batches(DecodeSamples(image_key, label_key), batch_format="numpy")


def ingest_config(deterministic: bool = True):
    """The ``dataset_config`` for TorchTrainer: split every dataset equally between workers, and
    (``deterministic``) keep block order so that a seed fixes each worker's sample order."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()  # what the driver's DataContext says
    options.preserve_order = options.preserve_order or deterministic
    return DataConfig(datasets_to_split="all", execution_options=options)


# ---------------------------------------------------------------- worker side


def worker_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible 31-bit seed per (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFFFFFF)


def to_model_batch(batch: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """uint8 images -> float32 in [-1, 1]; every other column as it is."""
    import torch

    out = dict(batch)
    image = out.get("image")
    if image is not None and image.dtype == torch.uint8:
        out["image"] = image.float().div_(127.5).sub_(1.0)
    return out


def iter_batches(split_name: str, batch_size: int, seed: int | None = None, epoch: int = 0,
                 skip_batches: int = 0, shuffle_buffer: int | None = None,
                 prefetch_batches: int = 1) -> Iterator[dict[str, "torch.Tensor"]]:
    """Inside a Train worker: one epoch of this worker's shard of dataset ``split_name``.

    Every worker gets the same number of batches (equal split, ``drop_last``). With a seed, rows
    are shuffled in a local buffer (default 8 batches) seeded by (seed, epoch, rank), so epochs
    differ and a re-run repeats them. ``skip_batches`` drops the first batches of the epoch: the
    trainer uses it to resume mid-epoch. Tensors stay on the CPU; the trainer moves them."""
    import ray.train

    shard = ray.train.get_dataset_shard(split_name)
    if shard is None:
        raise KeyError(f"no dataset {split_name!r} was given to the trainer")
    rank = ray.train.get_context().get_world_rank()
    shuffle = seed is not None
    batches = shard.iter_torch_batches(
        batch_size=batch_size, drop_last=True, prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=(shuffle_buffer or 8 * batch_size) if shuffle else None,
        local_shuffle_seed=worker_seed(seed, epoch, rank) if shuffle else None,
    )
    for index, batch in enumerate(batches):
        if index >= skip_batches:
            yield to_model_batch(batch)
