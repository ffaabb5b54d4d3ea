"""Shards as local files a worker can read at random: in place on a local root, staged from S3.

A training worker reads a window of samples spread over a few shards (``epoch_plan``), in an order
that jumps between them, so each shard must be seekable: on a local (or network-mounted) root the
shard file is read in place; from S3 it is downloaded whole into the worker's cache directory
(atomically: a temporary name, renamed when complete) and deleted once no window needs it. The
next window's shards download in the background while this one is read.

Each shard's sha256 is checked against the one its step recorded (``digests``), once per fetch and
before any sample of it is read: a changed shard is an ``IntegrityError`` naming it, not bad data.

A transient storage error (timeout, reset, throttling, 5xx) is retried ``retries`` times with
backoff, on top of boto3's own retries; then the step fails with the error, which names the
object. A missing object or denied access fails at once.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from components.common.storage import Storage, StorageError
from components.common.tar_index import TarIndex, index_tar

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5


def with_retries(what: str, fn, retries: int, base_s: float = RETRY_BASE_S):
    """``fn()``, retried on transient StorageErrors (``retries`` more attempts, doubling waits)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except StorageError as e:
            if not e.transient or attempt == retries:
                raise
            wait = base_s * 2 ** attempt
            log.warning("%s failed (%s); retry %d of %d in %.1f s", what, e, attempt + 1, retries, wait)
            time.sleep(wait)


class ShardFiles:
    """Local, indexed copies of the shards ``rels`` of ``storage``, fetched on demand."""

    def __init__(self, storage: Storage, rels: list[str], cache_dir: str | None = None, retries: int = 3,
                 download_threads: int = 2, digests: list[str] | None = None):
        self.storage, self.rels, self.retries = storage, list(rels), retries
        self.digests = digests  # each shard's recorded sha256: checked once per fetch, before any sample is read
        self._scratch = None if storage.is_local else Path(tempfile.mkdtemp(prefix="latentflow-shards-",
                                                                            dir=cache_dir))
        self._pool = None if storage.is_local else ThreadPoolExecutor(download_threads,
                                                                      thread_name_prefix="shard-download")
        self._pending: dict[int, Future] = {}
        self._held: dict[int, tuple[Path, TarIndex]] = {}
        self._lock = threading.Lock()

    def name(self, shard: int) -> str:
        return self.storage.uri(self.rels[shard])

    def prefetch(self, shards: list[int]) -> None:
        """Start fetching shards that will be needed soon (no-op on a local root)."""
        if self._pool is None:
            return
        with self._lock:
            for shard in shards:
                if shard not in self._held and shard not in self._pending:
                    self._pending[shard] = self._pool.submit(self._download, shard)

    def get(self, shard: int) -> tuple[Path, TarIndex]:
        """(local path, index) of a shard, fetching it if needed."""
        with self._lock:
            held = self._held.get(shard)
        if held is not None:
            return held
        if self._pool is None:
            path = self.storage.path(self.rels[shard])
        else:
            self.prefetch([shard])
            path = self._pending[shard].result()
        self._verify(shard, path)
        held = (path, index_tar(path, self.name(shard)))
        with self._lock:
            self._pending.pop(shard, None)
            self._held[shard] = held
        return held

    def _verify(self, shard: int, path: Path) -> None:
        if self.digests is None:
            return
        from components.common.step import IntegrityError
        from components.common.storage import sha256_file

        if sha256_file(path) != self.digests[shard]:
            raise IntegrityError(f"{self.name(shard)}: its sha256 is not the one its step recorded: the shard was "
                                 "changed after it was written; re-run the step that wrote it, or restore the file")

    def keep_only(self, shards: set[int]) -> None:
        """Forget (and delete, if downloaded) every held shard not in ``shards``."""
        with self._lock:
            dropped = [s for s in self._held if s not in shards]
            for shard in dropped:
                path, _ = self._held.pop(shard)
                if self._scratch is not None:
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def _download(self, shard: int) -> Path:
        rel = self.rels[shard]
        target = self._scratch / f"{shard:08d}.tar"
        partial = target.with_suffix(".partial")
        with_retries(f"download {self.name(shard)}", lambda: self.storage.download(rel, partial), self.retries)
        partial.rename(target)
        return target
