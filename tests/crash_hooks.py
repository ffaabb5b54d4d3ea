"""Tasks that fail on purpose, for the tests of resuming after a crash.

A step builds its task from its module's ``TASK_CLASSES`` (on the driver), and the task reaches the
Ray Train workers pickled. A test stands a ``crashing(...)`` builder in for one entry
(``monkeypatch.setitem``): the step then trains a subclass below, whose ``loss`` raises once the
armed step is reached, inside a worker. The subclasses live here, not in the stage code, and the
workers import this module by name (tests/ is on their PYTHONPATH, see conftest's ``ray_cluster``).
"""

from __future__ import annotations

from collections.abc import Callable

from components.controlnet.task import ControlNetTask
from components.distill.task import ConsistencyTask, ProgressiveTask
from components.dit.task import LatentDitTask, PixelDitTask


class CrashAtStep:
    """Mixin: ``loss`` raises at ``crash_at_step`` and after it, in round ``crash_in_round`` only
    when that is set (a progressive round's meta says which round it is)."""

    crash_at_step: int | None = None
    crash_in_round: int | None = None

    def loss(self, model, batch, step, generator):
        armed = self.crash_at_step is not None and step >= self.crash_at_step
        if armed and self.crash_in_round in (None, self.meta.get("round")):
            raise RuntimeError(f"injected failure at step {step}")
        return super().loss(model, batch, step, generator)


class CrashingLatentDitTask(CrashAtStep, LatentDitTask):
    pass


class CrashingPixelDitTask(CrashAtStep, PixelDitTask):
    pass


class CrashingProgressiveTask(CrashAtStep, ProgressiveTask):
    pass


class CrashingConsistencyTask(CrashAtStep, ConsistencyTask):
    pass


class CrashingControlNetTask(CrashAtStep, ControlNetTask):
    pass


CRASHING = {LatentDitTask: CrashingLatentDitTask, PixelDitTask: CrashingPixelDitTask,
            ProgressiveTask: CrashingProgressiveTask, ConsistencyTask: CrashingConsistencyTask,
            ControlNetTask: CrashingControlNetTask}


def crashing(task_class: type, at_step: int, in_round: int | None = None) -> Callable:
    """A stand-in for ``task_class`` that builds its crashing subclass, armed (the arming is kept on
    the instance, so it travels to the workers with it)."""
    def build(*args, **kwargs):
        task = CRASHING[task_class](*args, **kwargs)
        task.crash_at_step, task.crash_in_round = at_step, in_round
        return task

    return build
