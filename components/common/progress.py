"""Progress a person can follow: steps report to the driver, which draws one view.

A workflow's driver starts one ``ProgressBoard`` actor; each step gets a ``ProgressChannel`` (it
travels inside the step's ``StepTracker``) and its loops report through ``progress_bar``: how far,
of how much, and the latest metrics (loss, images/s). The driver polls the board and draws (see
``pipelines/console.py``). Workers print nothing per update, so no bar state floods the logs: a bar
inside a Ray worker also logs a line at every tenth of the way, for the workflow's log file.
Reporting is fire-and-forget and never fails the step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("latentflow.progress")

NAMESPACE = "latentflow"
REPORT_EVERY_S = 1.0  # a channel sends at most this often (and always the last update)
FLUSH_TIMEOUT_S = 5.0  # how long close() waits for its last report to reach the board


def board_name(workflow_id: str) -> str:
    return f"progress-{workflow_id}"


class ProgressBoard:
    """The latest report of each step (a Ray actor in the driver's cluster; plain class for tests)."""

    def __init__(self):
        self.reports: dict[str, dict[str, Any]] = {}

    def report(self, step: str, fields: dict[str, Any]) -> None:
        self.reports[step] = {**self.reports.get(step, {}), **fields, "at": time.time()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.reports


def start_board(workflow_id: str):
    """The workflow's board actor (the existing one when the driver already started it)."""
    import ray

    actor = ray.remote(num_cpus=0)(ProgressBoard)
    board = actor.options(name=board_name(workflow_id), namespace=NAMESPACE, get_if_exists=True).remote()
    ray.get(board.snapshot.remote())  # up and named before any step looks it up
    return board


class ProgressChannel:
    """A step's line to its workflow's board; picklable, looked up lazily where it is used."""

    def __init__(self, workflow_id: str, step: str):
        self.workflow_id, self.step = workflow_id, step
        self._actor, self._looked_up, self._last_sent = None, False, 0.0

    def __getstate__(self):
        return {"workflow_id": self.workflow_id, "step": self.step}

    def __setstate__(self, state):
        self.__init__(state["workflow_id"], state["step"])

    def _board(self):
        if not self._looked_up:
            self._looked_up = True
            try:
                import ray

                if ray.is_initialized():
                    self._actor = ray.get_actor(board_name(self.workflow_id), namespace=NAMESPACE)
            except Exception:  # noqa: BLE001 - no board (a test, a driver without a view): report nowhere
                self._actor = None
        return self._actor

    def report(self, force: bool = False, wait: bool = False, **fields: Any) -> None:
        """Sends at most every REPORT_EVERY_S unless ``force``; ``wait`` blocks (briefly) until the
        board has it, so a step's last report is on the board before the step returns: reports
        from a worker and the driver's reads are not ordered otherwise."""
        now = time.monotonic()
        if not force and now - self._last_sent < REPORT_EVERY_S:
            return
        board = self._board()
        if board is None:
            return
        self._last_sent = now
        try:
            sent = board.report.remote(self.step, fields)
            if wait:
                import ray

                ray.get(sent, timeout=FLUSH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the driver went away: the step's own work goes on
            self._actor = None


def in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - no Ray, or not connected: not a worker
        return False


class StepProgress:
    """``update(n, **metrics)``, ``close()``: reports to ``channel`` and, in a Ray worker, logs a
    line per tenth of ``total`` (what the workflow's log file keeps of the bar)."""

    def __init__(self, total: int | None, desc: str, unit: str, channel: ProgressChannel | None):
        self.total, self.desc, self.unit, self.channel = total, desc, unit, channel
        self.done, self.metrics, self._logged_tenth = 0, {}, 0

    def update(self, n: int = 1, **metrics: float) -> None:
        self.done += n
        self.metrics.update(metrics)
        self._send(force=self.total is not None and self.done >= self.total)
        if self.total:
            tenth = min(10, self.done * 10 // self.total)
            if tenth > self._logged_tenth:
                self._logged_tenth = tenth
                shown = " ".join(f"{k}={v:.4g}" for k, v in self.metrics.items())
                log.info("%s: %d/%d %s %s", self.desc, self.done, self.total, self.unit, shown)

    def set_description(self, text: str) -> None:
        self.desc = text

    def _send(self, force: bool, wait: bool = False) -> None:
        if self.channel is not None:
            self.channel.report(force=force, wait=wait, done=self.done, total=self.total, unit=self.unit, desc=self.desc,
                                **self.metrics)

    def close(self) -> None:
        self._send(force=True, wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", channel: ProgressChannel | None = None):
    """A bar with ``update(n, **metrics)``, ``set_description(text)`` and ``close()`` (also a
    context manager). In a Ray worker, or wherever a channel is given: a ``StepProgress`` (the
    driver draws it). Elsewhere, in a terminal of its own (``latentflow sample``): tqdm."""
    if channel is not None or in_ray_worker():
        return StepProgress(total, desc, unit, channel)
    from tqdm.auto import tqdm

    class MetricsTqdm(tqdm):
        def update(self, n=1, **metrics):
            if metrics:
                self.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            return super().update(n)

    return MetricsTqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
