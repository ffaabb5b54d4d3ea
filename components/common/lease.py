"""One writer per step: a lease in storage on a step's output directory.

Two runs of the same config, even under different workflow ids, compute the same cache key and so
the same ``steps/<step>/<key>/`` and checkpoint directory. Before a step trains, its task takes the
lease ``_lease.json`` there by an atomic create (``Storage.create_exclusive``: a hard link locally,
``If-None-Match: *`` on S3), renews it every ``ttl_s / 3`` from a background thread, and removes
it after the manifest is written. Another run that finds a live lease waits, polling for the
manifest, and then uses the result from cache; a lease not renewed for ``ttl_s`` (its holder died)
is taken over by a conditional overwrite (``replace_if``: ``If-Match`` on S3), which exactly one
taker wins. The holder's identity is its workflow id: a retry of the same workflow's step (its
task restarted after a node died) takes its own lease back at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from components.common.storage import Storage, StorageError

LEASE_NAME = "_lease.json"
DEFAULT_TTL_S = 90.0

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another run took this step's lease over (ours was not renewed in time): stop, write nothing."""


@dataclass(frozen=True)
class Holder:
    workflow_id: str
    attempt: str  # unique per acquisition
    host: str
    pid: int
    expires_at: float  # time.time()

    def describe(self) -> str:
        left = self.expires_at - time.time()
        return (f"workflow {self.workflow_id!r} (host {self.host}, pid {self.pid}; lease "
                f"{'expires in %.0f s' % left if left > 0 else 'expired %.0f s ago' % -left})")


class StepLease:
    def __init__(self, step_dir: Storage, workflow_id: str, ttl_s: float = DEFAULT_TTL_S):
        self.storage, self.workflow_id, self.ttl_s = step_dir, workflow_id, ttl_s
        self.attempt = uuid.uuid4().hex[:12]
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> bytes:
        holder = Holder(self.workflow_id, self.attempt, socket.gethostname(), os.getpid(), time.time() + self.ttl_s)
        return json.dumps(asdict(holder)).encode()

    def try_acquire(self) -> Holder | None:
        """Take the lease: None when we hold it now, else the live holder that has it."""
        while True:
            self.version = self.storage.create_exclusive(LEASE_NAME, self._record())
            if self.version is not None:
                return None
            try:
                data, version = self.storage.read_versioned(LEASE_NAME)
            except StorageError as e:
                if e.missing:  # released between our create and our read: try again
                    continue
                raise
            holder = _parse(data)
            if holder is not None and holder.expires_at > time.time() and holder.workflow_id != self.workflow_id:
                return holder
            # expired, unreadable, or our own workflow's: take it over, unless another taker won
            self.version = self.storage.replace_if(LEASE_NAME, self._record(), version)
            if self.version is not None:
                if holder is not None and holder.workflow_id != self.workflow_id:
                    log.warning("%s: took over the lease of %s", self.storage.uri(), holder.describe())
                return None

    def start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                version = self.storage.replace_if(LEASE_NAME, self._record(), self.version)
            except StorageError as e:  # a storage hiccup: keep trying until the lease would expire
                log.warning("%s: could not renew the lease (%s); retrying", self.storage.uri(), e)
                continue
            if version is None:
                self.lost = True
                log.error("%s: the lease was taken over by another run; this run will not write the result",
                          self.storage.uri())
                return
            self.version = version

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"{self.storage.uri()}: another run took this step over while it ran (its lease was "
                            f"not renewed within {self.ttl_s:.0f} s); this run's result is discarded")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost or self.version is None:
            return
        try:
            data, version = self.storage.read_versioned(LEASE_NAME)
            holder = _parse(data)
            if holder is not None and holder.attempt == self.attempt:
                self.storage.delete(LEASE_NAME)
        except StorageError as e:  # a lease left behind expires by itself
            log.warning("%s: could not remove the lease (%s); it expires in %.0f s", self.storage.uri(), e, self.ttl_s)


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None


def current_holder(step_dir: Storage) -> Holder | None:
    """The live holder of a step's lease, or None (no lease, or an expired one): for ``plan``."""
    try:
        data, _ = step_dir.read_versioned(LEASE_NAME)
    except StorageError as e:
        if e.missing:
            return None
        raise
    holder = _parse(data)
    return holder if holder is not None and holder.expires_at > time.time() else None
