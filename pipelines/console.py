"""What ``latentflow run`` shows while a workflow runs: one view on the driver, details in a file.

The view has a line per step: its state and, while it runs, a bar fed by the step's own reports
(``components.common.progress``: step, loss, images/s), with an ETA. In a terminal it is redrawn
in place; elsewhere (CI, ``| tee``, a Ray job's log) it prints a line per event and one per
quarter of each step's progress, so a whole workflow fits on a screen or two.

Everything else the driver process prints (Ray's messages and the lines it forwards from every
worker, DeepSpeed, Ray Train's checkpoint reports, MLflow) goes to the workflow's log file under
the storage root, ``workflows/<id>/logs/<start time>.log``; ``verbose`` also shows it as before.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from components.common.progress import NAMESPACE, board_name
from components.common.storage import Storage, StorageError

POLL_S = 1.0
QUARTERS = (25, 50, 75)  # where a non-interactive view prints a step's progress
STATE_STYLE = {"ran": "green", "cached": "cyan", "failed": "bold red", "killed": "bold red", "skipped": "yellow",
               "running": "white", "pending": "dim", "would_run": "green"}  # `plan`'s word for a step to run


def log_location(workflow_id: str) -> str:
    return f"workflows/{workflow_id}/logs/{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.log"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class StepView:
    """What the view knows of one step: its state and its latest progress report."""

    name: str
    state: str = "pending"
    started: float | None = None
    duration_s: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    first: tuple[float, int] | None = None  # (time, done) when this run first saw its progress: for the rate
    quarters_shown: set[int] = field(default_factory=set)

    def take(self, report: dict[str, Any], now: float) -> None:
        if report.get("desc") != self.report.get("desc") or report.get("done", 0) < self.report.get("done", 0):
            self.first, self.quarters_shown = None, set()  # a new bar (a distill round): a new rate
        self.report = report
        if self.first is None:
            self.first = (now, int(report.get("done", 0)))

    @property
    def fraction(self) -> float | None:
        total = self.report.get("total")
        return min(1.0, self.report.get("done", 0) / total) if total else None

    def eta_s(self, now: float) -> float | None:
        total, done = self.report.get("total"), self.report.get("done", 0)
        if not total or self.first is None or now <= self.first[0] or done <= self.first[1]:
            return None
        rate = (done - self.first[1]) / (now - self.first[0])
        return max(0.0, (total - done) / rate)

    def progress_text(self, now: float) -> str:
        r = self.report
        if not r:
            return ""
        desc = r.get("desc", "") if r.get("desc") not in (self.name, "train") else ""  # a distill round: its name
        parts = [f"{desc} {r.get('done', 0)}/{r.get('total') or '?'} {r.get('unit', '')}".strip()]
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4g}")
        if "images_per_s" in r:
            parts.append(f"{r['images_per_s']:.0f} img/s")
        if (eta := self.eta_s(now)) is not None and self.fraction != 1.0:
            parts.append(f"ETA {format_duration(eta)}")
        return "  ".join(parts)


class WorkflowView:
    """``event(event, record)`` from the runner; ``take(snapshot)`` from the progress board."""

    def __init__(self, out: Console, err: Console, live: bool):
        self.out, self.err, self.live = out, err, live
        self.steps: dict[str, StepView] = {}
        self.lock = threading.Lock()
        self._live: Live | None = None

    def step(self, name: str) -> StepView:
        return self.steps.setdefault(name, StepView(name))

    def event(self, event: str, record) -> None:
        with self.lock:
            view = self.step(record.name)
            view.state = record.status
            if event == "start":
                view.started = time.monotonic()
            view.duration_s = record.duration_s if event in ("ran", "failed") else None
            self._print_event(event, record)

    def _print_event(self, event: str, record) -> None:
        style = STATE_STYLE.get(record.status, "white")
        extra = f" in {record.duration_s:.1f}s" if event in ("ran", "failed") else ""
        key = record.cache_key[:12] if record.cache_key else "-"
        line = f"  [{style}]{event:>7}[/] {escape(record.name)} [dim]{key}[/]{extra}"
        target = self._live.console if self._live is not None else self.out
        target.print(line, soft_wrap=True)  # above the live table, which redraws below
        if record.error:
            self.err.print(f"          [red]{escape(str(record.error))}[/]", soft_wrap=True)

    def take(self, snapshot: dict[str, dict[str, Any]]) -> None:
        now = time.monotonic()
        with self.lock:
            for name, report in snapshot.items():
                view = self.steps.get(name)
                if view is None or view.state != "running":  # a late report of a step that ended
                    continue
                view.take(report, now)
                if not self.live:
                    self._print_quarters(view, now)
        if self._live is not None:
            self._live.update(self.table())

    def _print_quarters(self, view: StepView, now: float) -> None:
        fraction = view.fraction
        if fraction is None:
            return
        reached = [q for q in QUARTERS if fraction * 100 >= q and q not in view.quarters_shown]
        if reached:
            view.quarters_shown.update(reached)
            self.out.print(f"          {escape(view.name)} {fraction:>4.0%}  {escape(view.progress_text(now))}",
                           soft_wrap=True)

    def table(self) -> Table:
        now = time.monotonic()
        table = Table(box=None, show_header=False, pad_edge=False)
        for _ in range(4):
            table.add_column()
        with self.lock:
            for view in self.steps.values():
                style = STATE_STYLE.get(view.state, "white")
                elapsed = (view.duration_s if view.duration_s is not None else
                           now - view.started if view.started is not None and view.state == "running" else None)
                bar = ProgressBar(total=1.0, completed=view.fraction or 0.0, width=24) \
                    if view.state == "running" and view.fraction is not None else ""
                table.add_row(f"[{style}]{view.state:>7}[/] {escape(view.name)}", bar,
                              format_duration(elapsed) if elapsed is not None else "",
                              escape(view.progress_text(now)) if view.state == "running" else "")
        return table

    @contextmanager
    def showing(self, workflow_id: str) -> Iterator["WorkflowView"]:
        """Draw (in a terminal) and poll the workflow's progress board while the block runs."""
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(workflow_id, stop), daemon=True, name="latentflow-view")
        if self.live:
            self._live = Live(self.table(), console=self.out, refresh_per_second=2, transient=True)
            self._live.start()
        poller.start()
        try:
            yield self
        finally:
            stop.set()
            poller.join(timeout=5)
            if self._live is not None:
                self._live.stop()
                self._live = None

    def _poll(self, workflow_id: str, stop: threading.Event) -> None:
        board = None
        while not stop.wait(POLL_S):
            try:
                import ray

                if not ray.is_initialized():
                    continue
                board = board or ray.get_actor(board_name(workflow_id), namespace=NAMESPACE)
                self.take(ray.get(board.snapshot.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - no board yet, or Ray going down: the next poll tries again
                board = None


# Ray colours its worker prefixes ("\x1b[36m(pid=…)\x1b[0m") even when the stream is a file.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PlainText:
    """A text stream that drops terminal escape codes before writing, so a log file reads as text
    (Ray writes whole lines, so a code is never split across two writes)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(ANSI_ESCAPE.sub("", text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class Tee:
    """A text stream writing to several; everything else (``fileno``, ``encoding``) is the first's."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self.streams[0], name)


@contextmanager
def driver_output_to(log_file: Path, verbose: bool) -> Iterator[tuple[Any, Any]]:
    """While the block runs, this process's stdout and stderr (and logging handlers bound to them)
    go to ``log_file``, and to the terminal too when ``verbose``. Yields the terminal's (stdout,
    stderr) for the view. What the streams carried is redacted already (``install_output_redaction``
    wraps them); the file gets the same wrapping, and no terminal colour codes."""
    from components.common.redact import RedactingStream

    log_file.parent.mkdir(parents=True, exist_ok=True)
    terminal = (sys.stdout, sys.stderr)
    with open(log_file, "a", encoding="utf-8", buffering=1) as handle:
        to_file = RedactingStream(PlainText(handle))
        streams = tuple(Tee(to_file, t) if verbose else Tee(to_file) for t in terminal)
        moved = _point_handlers(dict(zip(terminal, streams)))
        sys.stdout, sys.stderr = streams
        try:
            yield terminal
        finally:
            sys.stdout, sys.stderr = terminal
            for handler, stream in moved:
                handler.setStream(stream)


def _point_handlers(mapping: dict) -> list[tuple[logging.StreamHandler, Any]]:
    """Point logging's stream handlers at the new streams (``basicConfig``'s handler and Ray's
    bind ``sys.stderr`` when they are made). Returns each handler moved, with its old stream."""
    moved = []
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and handler.stream in mapping:
                moved.append((handler, handler.stream))
                handler.setStream(mapping[handler.stream])
    return moved


class WorkflowLog:
    """The workflow's log file: written locally (under a local root, in place), uploaded at the end
    under an object-store root."""

    def __init__(self, root: Storage, workflow_id: str):
        self.root, self.rel = root, log_location(workflow_id)
        self.local = root.path(self.rel) if root.is_local else \
            Path(tempfile.mkdtemp(prefix="latentflow-log-")) / Path(self.rel).name
        self.uri = root.uri(self.rel)

    def where(self) -> str:
        return self.uri if self.root.is_local else f"{self.uri} (at the end; meanwhile {self.local})"

    def publish(self) -> str | None:
        """Upload a remote root's copy; the reason it failed, if it did."""
        if self.root.is_local or not self.local.exists():
            return None
        try:
            self.root.upload(self.rel, self.local)
        except StorageError as e:
            return f"could not upload the log to {self.uri} ({e}); it stays at {self.local}"
        return None
