"""The driver's console: the view's lines, progress through a real board actor, output capture.

The whole console of a real workflow (line count, the log file under the storage root) is asserted
on the smoke workflow in tests/test_pipeline.py."""

from __future__ import annotations

import io
import logging
import sys
from dataclasses import dataclass

import pytest
from rich.console import Console

from components.common.progress import ProgressBoard, ProgressChannel, StepProgress, start_board
from pipelines.console import StepView, WorkflowView, driver_output_to, format_duration


@dataclass
class Record:  # the fields of pipelines.workflow.StepRecord the view reads
    name: str
    status: str
    cache_key: str | None = "0123456789abcdef"
    duration_s: float = 0.0
    error: str | None = None


def plain_view() -> tuple[WorkflowView, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    view = WorkflowView(Console(file=out, width=200, color_system=None), Console(file=err, width=200, color_system=None),
                        live=False)
    return view, out, err


def test_a_plain_view_prints_each_event_and_each_quarter_once():
    view, out, err = plain_view()
    view.event("start", Record("dit", "running"))
    for done in (1, 2, 5, 5, 9, 16):
        view.take({"dit": {"done": done, "total": 16, "unit": "step", "desc": "train", "loss": 0.5 / done,
                           "images_per_s": 100.0}})
    view.take({"autoencoder": {"done": 3, "total": 4}})  # a step that is not running: ignored
    view.event("ran", Record("dit", "ran", duration_s=12.5))
    view.event("failed", Record("evaluate", "failed", duration_s=1.0, error="ValueError: bad"))
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["start", "dit", "0123456789ab"]
    progress = [line for line in lines if "%" in line]
    # 5/16 passes 25 %, 9/16 passes 50 %, 16/16 passes 75 % (shown as where it is: 100 %)
    assert [line.split()[1] for line in progress] == ["31%", "56%", "100%"]
    assert "5/16 step" in progress[0] and "loss 0.1" in progress[0] and "100 img/s" in progress[0]
    assert "train" not in progress[0]  # the loop's default name says nothing the step name does not
    assert "ETA" in progress[1] and "ETA" not in progress[2]
    assert lines[-2].split()[:2] == ["ran", "dit"] and lines[-2].endswith("in 12.5s")
    assert lines[-1].split()[:2] == ["failed", "evaluate"]
    assert "ValueError: bad" in err.getvalue()
    drawn = io.StringIO()  # what a terminal's live view draws: a row per step, the state first
    Console(file=drawn, width=200, color_system=None).print(view.table())
    assert [row.split()[:2] for row in drawn.getvalue().splitlines()] == [["ran", "dit"], ["failed", "evaluate"]]


def test_the_eta_follows_the_rate_since_the_view_first_saw_the_step():
    view = StepView("dit", state="running")
    view.take({"done": 10, "total": 110, "desc": "train"}, now=100.0)
    assert view.eta_s(100.0) is None  # one report: no rate yet
    view.take({"done": 30, "total": 110, "desc": "train"}, now=110.0)  # 2 steps/s, 80 to go
    assert view.eta_s(110.0) == pytest.approx(40.0)
    view.take({"done": 2, "total": 10, "desc": "round_2"}, now=120.0)  # the next distill round: a new bar
    assert view.eta_s(120.0) is None and "round_2 2/10" in view.progress_text(120.0)
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_a_step_progress_logs_tenths_and_its_last_update_reaches_the_board(caplog):
    board = ProgressBoard()

    class LocalChannel(ProgressChannel):  # the board in this process instead of an actor
        def report(self, force=False, wait=False, **fields):
            board.report(self.step, fields)

    caplog.set_level(logging.INFO, logger="latentflow.progress")
    with StepProgress(20, "images encoded", "image", LocalChannel("wf", "latents")) as bar:
        for _ in range(20):
            bar.update(1, loss=0.25)
    assert len(caplog.records) == 10 and "20/20 image loss=0.25" in caplog.records[-1].getMessage()
    assert board.snapshot()["latents"]["done"] == 20 and board.snapshot()["latents"]["loss"] == 0.25


def test_a_channel_reaches_the_driver_board_from_a_ray_task(ray_cluster):
    import ray

    board = start_board("wf-console-test")  # held here, as pipelines/runtime.py holds it while a workflow runs

    @ray.remote(num_cpus=0)
    def step_loop(channel):
        bar = StepProgress(3, "train", "step", channel)
        for _ in range(3):
            bar.update(1, loss=1.0)
        bar.close()

    ray.get(step_loop.remote(ProgressChannel("wf-console-test", "dit")))
    report = ray.get(board.snapshot.remote())["dit"]
    assert (report["done"], report["total"], report["unit"], report["loss"]) == (3, 3, "step", 1.0)
    ProgressChannel("no-such-workflow", "dit").report(force=True, done=1)  # no board: reports nowhere, no error


def test_driver_output_goes_to_the_log_file_and_to_the_terminal_only_when_verbose(tmp_path, monkeypatch):
    terminal_out, terminal_err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal_out)
    monkeypatch.setattr(sys, "stderr", terminal_err)
    handler = logging.StreamHandler(sys.stderr)  # bound when made, as Ray's own handler is
    logger = logging.getLogger("test.console.ray")
    logger.addHandler(handler)
    try:
        with driver_output_to(tmp_path / "logs" / "a.log", verbose=False) as (out, err):
            print("\x1b[36m(RayTrainWorker pid=1)\x1b[0m hello")  # Ray colours its prefixes
            logger.warning("ray says so")
            sys.stderr.write("password https://u:s3cret@host/x\n")
            assert out is terminal_out and err is terminal_err
        logger.warning("after")
        with driver_output_to(tmp_path / "logs" / "a.log", verbose=True):
            print("verbose line")
    finally:
        logger.removeHandler(handler)
    text = (tmp_path / "logs" / "a.log").read_text()
    assert "(RayTrainWorker pid=1) hello" in text and "ray says so" in text and "verbose line" in text
    assert "\x1b" not in text  # plain text: no terminal colour codes
    assert "s3cret" not in text and "after" not in text  # redacted; the handler is back on the terminal
    assert terminal_out.getvalue() == "verbose line\n" and terminal_err.getvalue() == "after\n"
