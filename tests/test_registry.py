"""The promotion gate's decision (pure logic: model versions stand in as plain objects)."""

from __future__ import annotations

from types import SimpleNamespace

from pipelines.config import PipelineConfig
from pipelines.registry import decide


def version(number: str, value: float | None, evaluator: str = "e1"):
    tags = {"latentflow.evaluator": evaluator}
    if value is not None:
        tags["eval.sample_accuracy"] = repr(value)
        tags["eval.frechet_distance"] = repr(10 * value)
    return SimpleNamespace(version=number, tags=tags)


def test_gate_promotes_only_a_better_model_on_the_same_evaluator():
    cfg = PipelineConfig(name="t", registry={"margin": 0.01})
    assert decide(cfg, version("1", 0.9), None)[:2] == (True, "no champion yet")
    promoted, reason, new, old = decide(cfg, version("2", 0.95), version("1", 0.9))
    assert promoted and (new, old) == (0.95, 0.9) and "beats" in reason
    assert not decide(cfg, version("2", 0.905), version("1", 0.9))[0]  # within the margin
    assert not decide(cfg, version("2", 0.8), version("1", 0.9))[0]
    assert decide(cfg, version("1", 0.9), version("1", 0.9))[1] == "already the champion (nothing re-ran)"
    assert "another evaluator" in decide(cfg, version("2", 0.99), version("1", 0.9, "e2"))[1]
    assert not decide(cfg, version("2", None), version("1", 0.9))[0]
    distances = PipelineConfig(name="t", registry={"gate_metric": "frechet_distance", "gate_mode": "min"})
    assert decide(distances, version("2", 0.5), version("1", 0.9))[0]  # FD 5 < 9: better
    assert not decide(distances, version("2", 0.95), version("1", 0.9))[0]
