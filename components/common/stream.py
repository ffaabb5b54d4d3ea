"""The one data path of every learned stage: batches streamed from shards, with a resumable position.

A ``BatchSource`` gives a worker its batches of one epoch from a position: ``epoch(e, position,
batches_done)`` yields ``StreamedBatch``es, each carrying the position just after it, which the
trainer saves in its checkpoint. Resuming at that position reads on from there: nothing consumed
is read or decoded again, and on one node the batches are exactly those of an uninterrupted run.

- ``ShardSource``: from webdataset shards (``SplitSpec``), in ``EpochPlan`` order. A background
  thread reads each sample's bytes (``SampleReader``), decodes them (``decoder``, on
  ``decode_threads`` threads, results kept in order), stacks ``micro_batch`` of them, applies the
  batch ``transform`` (resizing, SR pairs) and queues up to ``prefetch_batches`` batches ahead.
- ``TensorSource``: from tensors already in memory (tests, benchmarks), in the same plan order; a
  list (captions) is indexed like a tensor.

A decoder's str values (captions) are batched as a list of str, not a tensor.

Every rank yields ``span_length // micro_batch`` batches per epoch (the plan gives every rank the
same span length), so no rank waits at the end of an epoch for a collective another never reaches.
Memory per worker: prefetch_batches x micro_batch x (decoded sample + transformed sample), plus
one shuffle window of integers; shards staged from S3 take disk (two windows' worth), not memory.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
from pydantic import Field

from components.common.config import StrictModel
from components.common.epoch_plan import EpochPlan
from components.common.sample_reader import RawSample, SampleReader, ShardDataError, SkipCounter, SplitSpec

if TYPE_CHECKING:
    import torch

STOP_POLL_S = 0.2


class LoaderConfig(StrictModel):
    """How a worker streams its data (``train.loader``)."""

    cache_exempt: ClassVar[frozenset[str]] = frozenset({"prefetch_batches", "decode_threads", "cache_dir", "retries"})

    shuffle_window: int = Field(8192, ge=1)  # samples shuffled together (a block shuffle over shards)
    prefetch_batches: int = Field(4, ge=1)  # batches decoded ahead of the training loop
    decode_threads: int = Field(1, ge=0)  # 0: decode in the reading thread
    cache_dir: str | None = None  # where S3 shards are staged (default: the system's temp dir)
    retries: int = Field(3, ge=0)  # extra attempts at a transient storage error, then the step fails


@dataclass
class StreamedBatch:
    tensors: dict[str, "torch.Tensor"]  # and a list of str per text field (``caption``) when decoded
    epoch: int
    position: int  # the position just after this batch, in the rank's epoch order
    skipped: int = 0  # bad samples passed over while assembling it
    keys: list[str] = field(default_factory=list)


class BatchSource(Protocol):
    def batches_per_epoch(self, epoch: int) -> int: ...

    def epoch(self, epoch: int, position: int, batches_done: int) -> Iterator[StreamedBatch]: ...

    def close(self) -> None: ...


def batches_per_epoch(plan: EpochPlan, micro_batch: int) -> int:
    count = plan.span_length // micro_batch
    if count == 0:
        raise ValueError(f"an epoch gives each of {plan.world_size} workers {plan.span_length} samples, fewer "
                         f"than its micro-batch of {micro_batch}: lower train.batch_size or add data")
    return count


# Variable-length fields (a caption's stored token embeddings, (L_i, D)) and the mask their padding adds.
PADDED_FIELDS = {"context": "context_mask"}


def stack(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample dicts of arrays and numbers -> one dict of batched tensors; text (a caption) stays
    a list of str, one per sample; a ``PADDED_FIELDS`` field is zero-padded to the batch's longest, with
    its mask (True on real rows)."""
    import torch

    batch = {}
    for name in samples[0]:
        if isinstance(samples[0][name], str):
            batch[name] = [s[name] for s in samples]
        elif name in PADDED_FIELDS:
            batch[name], batch[PADDED_FIELDS[name]] = pad_ragged([s[name] for s in samples])
        else:
            batch[name] = torch.from_numpy(np.stack([np.asarray(s[name]) for s in samples]))
    return batch


def pad_ragged(arrays: list[np.ndarray]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(L_i, ...) arrays -> (B, L_max, ...) zero-padded at the end, and the mask (B, L_max), True on real rows."""
    import torch

    longest = max(len(a) for a in arrays)
    padded = np.zeros((len(arrays), longest, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    mask = np.zeros((len(arrays), longest), dtype=bool)
    for row, array in enumerate(arrays):
        padded[row, :len(array)], mask[row, :len(array)] = array, True
    return torch.from_numpy(padded), torch.from_numpy(mask)


class ShardSource:
    """Batches of one rank from a split of shards; see the module docstring."""

    def __init__(self, spec: SplitSpec, decoder: Callable[[str, dict[str, bytes]], dict[str, Any]],
                 micro_batch: int, seed: int | None, rank: int, world_size: int, loader: LoaderConfig,
                 transform: Callable[[dict], dict] | None = None):
        self.spec, self.decoder, self.transform, self.loader = spec, decoder, transform, loader
        self.micro_batch, self.seed, self.rank, self.world_size = micro_batch, seed, rank, world_size
        self.skips = SkipCounter(spec.on_bad_sample, spec.name)
        self.reader: SampleReader | None = None

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(tuple(self.spec.counts), self.seed, epoch, self.rank, self.world_size,
                         self.loader.shuffle_window)

    def batches_per_epoch(self, epoch: int) -> int:
        return batches_per_epoch(self.plan(epoch), self.micro_batch)

    def epoch(self, epoch: int, position: int, batches_done: int) -> Iterator[StreamedBatch]:
        remaining = self.batches_per_epoch(epoch) - batches_done
        if self.reader is None:
            self.reader = SampleReader(self.spec, self.loader.cache_dir, self.loader.retries)
        out: queue.Queue = queue.Queue(maxsize=self.loader.prefetch_batches)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(epoch, position, remaining, out, stop),
                                    name=f"stream-{self.spec.name}", daemon=True)
        producer.start()
        try:
            for _ in range(remaining):
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            producer.join()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    # ------------------------------------------------------------ the producer thread

    def _produce(self, epoch: int, position: int, remaining: int, out: queue.Queue, stop: threading.Event) -> None:
        decoded = self._decoded(self.reader.samples(self.plan(epoch), position), stop)
        try:
            for _ in range(remaining):
                batch = self._assemble(decoded, epoch)
                if batch is None or not _put(out, batch, stop):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            _put(out, e, stop)
        finally:
            decoded.close()  # stops its decode pool; what it read ahead is dropped, not consumed

    def _decoded(self, raw: Iterator[RawSample], stop: threading.Event) -> Iterator[tuple[RawSample, Any]]:
        """(raw sample, decoded dict or the exception), in plan order, decoding on a thread pool."""
        threads = self.loader.decode_threads
        if threads == 0:
            for sample in raw:
                yield sample, self._decode(sample)
            return
        ahead: deque = deque()
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
            for sample in raw:
                ahead.append((sample, pool.submit(self._decode, sample)))
                if len(ahead) >= 4 * threads:
                    first, future = ahead.popleft()
                    yield first, future.result()
                if stop.is_set():
                    return

    def _decode(self, sample: RawSample):
        if sample.problem is not None:
            return ShardDataError(sample.problem)
        try:
            return self.decoder(sample.key, sample.data)
        except ShardDataError as e:
            return e

    def _assemble(self, decoded: Iterator[tuple[RawSample, Any]], epoch: int) -> StreamedBatch | None:
        samples, keys, skipped, misses = [], [], 0, 0
        span = self.plan(epoch).span_length
        for raw, value in decoded:
            if isinstance(value, ShardDataError):
                self.skips.bad(raw.shard, raw.key, str(value))
                skipped, misses = skipped + 1, misses + 1
                if misses > span:
                    raise ShardDataError(f"{self.spec.name}: no readable sample in rank {self.rank}'s share "
                                         f"of epoch {epoch} ({span} samples)")
                continue
            misses = 0
            samples.append(value)
            keys.append(f"{raw.shard}:{raw.key}")
            if len(samples) == self.micro_batch:
                tensors = stack(samples)
                tensors = self.transform(tensors) if self.transform is not None else tensors
                return StreamedBatch(tensors, epoch, raw.position + 1, skipped, keys)
        return None


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=STOP_POLL_S)
            return True
        except queue.Full:
            continue
    return False


class TensorSource:
    """Batches of one rank from tensors in memory (same first dimension), in ``EpochPlan`` order."""

    def __init__(self, tensors: dict[str, "torch.Tensor"], micro_batch: int, seed: int | None, rank: int,
                 world_size: int, window: int = 8192, transform: Callable[[dict], dict] | None = None):
        self.tensors, self.transform = tensors, transform
        self.rows = len(next(iter(tensors.values())))
        self.micro_batch, self.seed, self.rank, self.world_size, self.window = micro_batch, seed, rank, world_size, window

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan((self.rows,), self.seed, epoch, self.rank, self.world_size, self.window)

    def batches_per_epoch(self, epoch: int) -> int:
        return batches_per_epoch(self.plan(epoch), self.micro_batch)

    def epoch(self, epoch: int, position: int, batches_done: int) -> Iterator[StreamedBatch]:
        import torch

        entries = self.plan(epoch).entries(position)
        for _ in range(self.batches_per_epoch(epoch) - batches_done):
            rows = [next(entries) for _ in range(self.micro_batch)]
            index = torch.tensor([sample for _, _, _, sample in rows])
            tensors = {name: [value[i] for i in index.tolist()] if isinstance(value, list) else value[index]
                       for name, value in self.tensors.items()}
            tensors = self.transform(tensors) if self.transform is not None else tensors
            yield StreamedBatch(tensors, epoch, rows[-1][0] + 1, 0, [str(int(i)) for i in index])

    def close(self) -> None:
        pass
