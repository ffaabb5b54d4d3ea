"""Read every sample of a set of webdataset shards into memory, local or on S3.

The in-memory path of small data sets (MNIST-scale images, pre-extracted latents): one process
reads all of it once, then slices batches out of arrays, with none of Ray Data's per-batch overhead.
Ray Data (``components.common.data.shard_dataset``) is the streaming alternative for data sets that
do not fit in a worker's memory.

- ``read_shard_samples(storage, rels, suffixes)``: raw samples (``__key__`` plus one ``bytes``
  value per kept suffix), shards in the given order, samples in file order. S3 shards are
  downloaded (a few in parallel) to a temporary directory and deleted after reading.
- ``read_image_shards(storage, rels, image_key)``: decoded images, uint8 (N, C, H, W), and labels.
- ``rank_batch_indices(n, batch_size, seed, epoch, rank, world_size)``: this rank's batches of one
  epoch; every rank gets the same number of full batches.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from components.common.data import ShardDataError, decode_image, worker_seed
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


def read_shard_samples(storage: Storage, rels: Sequence[str],
                       suffixes: Sequence[str] | None = None) -> list[dict]:
    return list(iter_shard_samples(storage, rels, suffixes))


def parse_label(value: bytes | None, key: str) -> int:
    """A ``cls`` field -> int; -1 when the sample has none (unlabelled source)."""
    if value is None:
        return -1
    try:
        return int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ShardDataError(f"sample {key!r}: cls is not an integer: {value[:20]!r}") from e


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


def rank_batch_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int,
                       world_size: int) -> list[np.ndarray]:
    """Row indices of this rank's batches of one epoch.

    One permutation of ``n`` rows per (seed, epoch), the same on every rank; rank r takes rows
    r, r + world_size, ... of it and cuts them into full batches. Every rank gets
    ``(n // world_size) // batch_size`` batches (the remainder is dropped), so no rank waits at the
    end of an epoch for a collective that another never reaches."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
    order = np.random.default_rng(worker_seed(seed, epoch, 0)).permutation(n)
    per_rank = n // world_size
    mine = order[rank::world_size][:per_rank]
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(per_rank // batch_size)]
