"""Tasks that fail on purpose, for the tests of resuming after a crash.

A step builds its task from its module's ``TASK_CLASSES`` (on the driver), and the task reaches the
Ray Train workers pickled. A test stands a ``crashing(...)`` builder in for one entry
(``monkeypatch.setitem``): the step then trains a subclass below, whose ``loss`` raises once the
armed step is reached, inside a worker. The subclasses live here, not in the stage code, and the
workers import this module by name (tests/ is on their PYTHONPATH, see conftest's ``ray_cluster``).
"""

from __future__ import annotations

from collections.abc import Callable

from components.autoencoder.task import AutoencoderTask
from components.controlnet.task import ControlNetTask
from components.distill.task import ConsistencyTask, ProgressiveTask
from components.dit.task import LatentDitTask, PixelDitTask
from components.noisy_classifier.task import NoisyClassifierTask
from components.superres.task import SuperResTask


def task_round(task) -> int | None:
    """The progressive round a task trains (its meta's ``round``), None for a task without rounds;
    the meta is a dict or a dataclass."""
    meta = getattr(task, "meta", None)
    return meta.get("round") if isinstance(meta, dict) else getattr(meta, "round", None)


class CrashAtStep:
    """Mixin: ``loss`` raises at ``crash_at_step`` and after it, in round ``crash_in_round`` only
    when that is set (a progressive round's meta says which round it is)."""

    crash_at_step: int | None = None
    crash_in_round: int | None = None

    def loss(self, model, batch, step, generator):
        armed = self.crash_at_step is not None and step >= self.crash_at_step
        if armed and self.crash_in_round in (None, task_round(self)):
            raise RuntimeError(f"injected failure at step {step}")
        return super().loss(model, batch, step, generator)


# One crashing subclass per task class a stage's TASK_CLASSES holds (module-level, so that the
# workers unpickle them by name); tests/test_resume_contract.py checks none is missing.
class CrashingAutoencoderTask(CrashAtStep, AutoencoderTask): pass  # noqa: E701
class CrashingLatentDitTask(CrashAtStep, LatentDitTask): pass  # noqa: E701
class CrashingPixelDitTask(CrashAtStep, PixelDitTask): pass  # noqa: E701
class CrashingProgressiveTask(CrashAtStep, ProgressiveTask): pass  # noqa: E701
class CrashingConsistencyTask(CrashAtStep, ConsistencyTask): pass  # noqa: E701
class CrashingSuperResTask(CrashAtStep, SuperResTask): pass  # noqa: E701
class CrashingNoisyClassifierTask(CrashAtStep, NoisyClassifierTask): pass  # noqa: E701
class CrashingControlNetTask(CrashAtStep, ControlNetTask): pass  # noqa: E701


CRASHING: dict[type, type] = {crashing_class.__bases__[1]: crashing_class for crashing_class in CrashAtStep.__subclasses__()}


def crashing(task_class: type, at_step: int, in_round: int | None = None) -> Callable:
    """A stand-in for ``task_class`` that builds its crashing subclass, armed (the arming is kept on
    the instance, so it travels to the workers with it)."""
    if task_class not in CRASHING:
        raise KeyError(f"tests/crash_hooks.py has no crashing subclass of {task_class.__name__}; add its one-line class")
    def build(*args, **kwargs):
        task = CRASHING[task_class](*args, **kwargs)
        task.crash_at_step, task.crash_in_round = at_step, in_round
        return task

    return build
