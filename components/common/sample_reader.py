"""A rank's raw samples of one epoch, in ``EpochPlan`` order, from any position: the bytes of each
sample's files, read at their offsets in the shard (``tar_index``), never by replaying the shard.

Bad data is met here or by the decoder: a sample missing from a truncated shard, a required file
missing from a sample, bytes that do not decode. Under the shard step's ``on_bad_sample: skip`` it
is counted and logged, naming the shard and the key; under ``fail`` the step stops with that name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from components.common.epoch_plan import EpochPlan
from components.common.shard_files import ShardFiles
from components.common.storage import Storage
from components.common.tar_index import read_member

log = logging.getLogger(__name__)

LOGGED_SKIPS = 20  # the first skips are logged one by one, later ones every SKIP_LOG_EVERY


class ShardDataError(ValueError):
    """A shard's contents cannot be turned into training batches; the message names the sample."""


@dataclass(frozen=True)
class SplitSpec:
    """One split of a step's shards as a stream reads it; small and picklable (it travels to workers)."""

    location: str  # the step's output directory
    shards: tuple[str, ...]  # relative paths, manifest order
    counts: tuple[int, ...]  # samples per shard, as the writing step recorded them
    fields: tuple[str, ...]  # suffixes every sample must have (e.g. "png")
    optional: tuple[str, ...] = ()  # suffixes read when present (e.g. "cls" of an unlabelled set)
    on_bad_sample: str = "fail"  # the shard step's policy: "skip" (count, log) or "fail"
    name: str = "shards"  # what to call it in messages
    digests: tuple[str, ...] = ()  # each shard's sha256 as its step recorded it; () reads unverified

    def __post_init__(self):
        if len(self.shards) != len(self.counts) or (self.digests and len(self.digests) != len(self.shards)):
            raise ValueError(f"{self.name}: {len(self.shards)} shards but {len(self.counts)} counts and "
                             f"{len(self.digests)} digests")


@dataclass
class RawSample:
    position: int  # in the rank's epoch order (EpochPlan)
    shard: str
    key: str
    data: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None  # set: the sample cannot be used, and why


class SkipCounter:
    """Applies the bad-sample policy: raises under "fail", counts and logs under "skip"."""

    SKIP_LOG_EVERY = 1000

    def __init__(self, policy: str, name: str):
        self.policy, self.name, self.count = policy, name, 0

    def bad(self, shard: str, key: str, reason: str) -> None:
        where = f"{self.name}: sample {key!r} of {shard}"
        if self.policy != "skip":
            raise ShardDataError(f"{where}: {reason} (on_bad_sample: fail)")
        self.count += 1
        if self.count <= LOGGED_SKIPS or self.count % self.SKIP_LOG_EVERY == 0:
            log.warning("%s: %s; skipped (%d so far)", where, reason, self.count)


class SampleReader:
    """Reads the raw samples a plan names; holds the shard files of the current and next window."""

    def __init__(self, spec: SplitSpec, cache_dir: str | None = None, retries: int = 3):
        self.spec = spec
        self.files = ShardFiles(Storage.from_uri(spec.location), list(spec.shards), cache_dir, retries,
                                digests=list(spec.digests) or None)
        self._handles: dict[int, object] = {}
        self._warned_counts: set[int] = set()

    def samples(self, plan: EpochPlan, start: int) -> Iterator[RawSample]:
        window = None
        for position, window_index, shard, sample in plan.entries(start):
            if window_index != window:
                window = window_index
                self._enter_window(plan, window_index)
            yield self._read(position, shard, sample)

    def _enter_window(self, plan: EpochPlan, window_index: int) -> None:
        current = plan.shards_of_window(window_index)
        upcoming = plan.shards_of_window((window_index + 1) % max(plan.num_windows, 1))
        keep = set(current) | set(upcoming)
        for shard in [s for s in self._handles if s not in keep]:
            self._handles.pop(shard).close()
        self.files.keep_only(keep)
        self.files.prefetch(current + [s for s in upcoming if s not in current])

    def _read(self, position: int, shard: int, sample: int) -> RawSample:
        rel = self.spec.shards[shard]
        path, index = self.files.get(shard)
        if len(index) != self.spec.counts[shard] and shard not in self._warned_counts:
            self._warned_counts.add(shard)
            log.warning("%s: %s holds %d samples, %d were written%s", self.spec.name, rel, len(index),
                        self.spec.counts[shard], "; " + "; ".join(index.problems) if index.problems else "")
        if sample >= len(index):
            return RawSample(position, rel, f"#{sample}", problem="missing from the shard (truncated or damaged: "
                             + ("; ".join(index.problems) or "fewer samples than recorded") + ")")
        key, members = index.keys[sample], index.members[sample]
        missing = [f for f in self.spec.fields if f not in members]
        if missing:
            return RawSample(position, rel, key, problem=f"has no {', '.join(missing)} file")
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(path, "rb")
        wanted = [f for f in (*self.spec.fields, *self.spec.optional) if f in members]
        return RawSample(position, rel, key, {f: read_member(handle, *members[f]) for f in wanted})

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self.files.close()


def iter_split_fields(spec: SplitSpec, suffixes: tuple[str, ...], retries: int = 3) -> Iterator[dict[str, bytes]]:
    """The ``suffixes`` members of every sample of a split that has them all, shard by shard in manifest
    order: one pass, each shard verified against its recorded digest as training reads are, one shard
    held at a time (a vocabulary built from the captions, without reading the latents)."""
    files = ShardFiles(Storage.from_uri(spec.location), list(spec.shards), None, retries,
                       digests=list(spec.digests) or None)
    try:
        for shard in range(len(spec.shards)):
            path, index = files.get(shard)
            with open(path, "rb") as handle:
                for members in index.members:
                    if all(suffix in members for suffix in suffixes):
                        yield {suffix: read_member(handle, *members[suffix]) for suffix in suffixes}
            files.keep_only(set())
    finally:
        files.close()
