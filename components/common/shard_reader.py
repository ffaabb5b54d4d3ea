"""Reading webdataset shards front to back, local or on S3: for passes over a whole split that
need no training order (the latents step, reference statistics) and for small, bounded reads (a
validation sample, a grid). Training batches come from ``components.common.stream`` instead.

- ``iter_shard_samples(storage, rels, suffixes)``: raw samples (``__key__``, ``__shard__`` plus one
  ``bytes`` value per kept suffix), shards in the given order, samples in file order. S3 shards
  are downloaded (a few ahead) to a temporary directory and deleted once read.
- ``iter_image_batches(storage, rels, image_key, batch_size, size, filter)``: a whole split once, in
  order, as (uint8 images (B, C, H, W), int64 labels (B,)) batches: memory is one batch;
- ``read_image_shards(storage, rels, image_key, limit=...)``: decoded images, uint8 (N, C, H, W),
  and labels, all in memory: only with a ``limit``, or for sets known to be small.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from components.common.data import ShardDataError, decode_image, parse_label
from components.common.storage import Storage

DOWNLOAD_THREADS = 4


def _iter_tar(path: str | Path, suffixes: set[str] | None) -> Iterator[dict]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as stream:
        files = tar_file_expander([{"url": str(path), "stream": stream}])
        yield from group_by_keys(files, suffixes=suffixes)


def iter_shard_samples(storage: Storage, rels: Sequence[str],
                       suffixes: Sequence[str] | None = None) -> Iterator[dict]:
    """Samples of the shards ``rels`` (relative to ``storage``), in order: ``__key__``, ``__shard__``
    (the rel it came from) and the bytes of each suffix in ``suffixes`` (all when None)."""
    keep = set(suffixes) if suffixes is not None else None
    if storage.is_local:
        for rel in rels:
            for sample in _iter_tar(storage.path(rel), keep):
                sample.pop("__url__", None)
                yield {**sample, "__shard__": rel}
        return
    scratch = Path(tempfile.mkdtemp(prefix="latentflow-shards-"))
    try:
        locals_ = [scratch / f"{i:06d}.tar" for i in range(len(rels))]
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            # Downloads run at most DOWNLOAD_THREADS shards ahead of the reader (bounded local
            # disk); each file is deleted once read.
            futures = {}
            for i, (rel, path) in enumerate(zip(rels, locals_)):
                for ahead in range(i, min(i + DOWNLOAD_THREADS, len(rels))):
                    if ahead not in futures:
                        futures[ahead] = pool.submit(storage.download, rels[ahead], locals_[ahead])
                futures.pop(i).result()
                for sample in _iter_tar(path, keep):
                    sample.pop("__url__", None)
                    yield {**sample, "__shard__": rel}
                path.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_image_shards(storage: Storage, rels: Sequence[str], image_key: str = "png",
                      label_key: str = "cls", limit: int | None = None, size: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, C, H, W), labels int64 (N,) with -1 for none, keys) of the shards, in
    order; ``limit`` stops after that many samples (later shards are then not read); ``size``
    resizes the images to size x size (``components.common.resample``: a base resolution below the
    shard images')."""
    images, labels, keys = [], [], []
    for sample in iter_shard_samples(storage, rels, (image_key, label_key)):
        key = sample["__key__"]
        if image_key not in sample:
            raise ShardDataError(f"sample {key!r} in {sample['__shard__']} has no {image_key!r} field")
        images.append(decode_image(sample[image_key], key))
        labels.append(parse_label(sample.get(label_key), key))
        keys.append(key)
        if limit is not None and len(keys) >= limit:
            break
    if not images:
        raise ShardDataError(f"no samples in shards {list(rels)[:3]} under {storage.uri()}")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ShardDataError(f"images of different shapes: {sorted(shapes)}")
    stacked = np.stack(images)
    if size is not None:
        from components.common.resample import resize_uint8

        stacked = resize_uint8(stacked, size)
    return stacked, np.asarray(labels, dtype=np.int64), keys


def iter_image_batches(storage: Storage, rels: Sequence[str], image_key: str, batch_size: int,
                       size: int | None = None, filter: str = "bicubic") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every sample of the shards once, in order, decoded (and resized to ``size`` with ``filter``), in
    batches of ``batch_size`` (the last one shorter)."""
    from components.common.data import ImageDecoder

    decoder, images, labels = ImageDecoder(image_key, size, filter), [], []
    for sample in iter_shard_samples(storage, rels, (image_key, "cls")):
        if image_key not in sample:
            raise ShardDataError(f"sample {sample['__key__']!r} in {sample['__shard__']} has no {image_key!r} field")
        decoded = decoder(sample["__key__"], sample)
        images.append(decoded["image"])
        labels.append(decoded["label"])
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels, np.int64)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels, np.int64)
