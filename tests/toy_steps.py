"""Toy stages for workflow-runner tests: each writes a small file derived from its config and inputs
and records every execution in a ledger, so tests can count what actually ran."""

from __future__ import annotations

import os
import time

from components.common.config import StepConfig
from components.common.step import Manifest, StepContext, StepOutput

CODE_VERSION = "1"


class ToyConfig(StepConfig):
    value: str = "x"
    sleep_s: float = 0.0


def produce(cfg: ToyConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    started = time.time()
    upstream = "".join(m.storage().read_text("out.txt") for _, m in sorted(inputs.items()))
    ctx.output.write_text("out.txt", f"{ctx.step}:{cfg.value}[{upstream}]")
    time.sleep(cfg.sleep_s)
    crash_marker = ctx.root.path(f"crash/{ctx.step}") if ctx.root.is_local else None
    if crash_marker is not None and crash_marker.exists():
        crash_marker.unlink()
        os._exit(1)  # the worker dies after writing outputs, before the manifest
    ctx.root.write_text(f"ledger/{ctx.step}/{time.time_ns()}", f"{started} {time.time()}")
    ctx.tracker.log_metrics({"length": len(upstream)})
    return StepOutput(files=["out.txt"], metrics={"length": len(upstream)}, info={"value": cfg.value})


def fail(cfg: ToyConfig, inputs, ctx) -> StepOutput:
    raise ValueError(f"toy failure in {ctx.step}")
