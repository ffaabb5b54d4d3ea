"""The model registry and the promotion gate of ``latentflow retrain``.

Registration: every trained component of a finished workflow (autoencoder, dit, distill,
superres_k) becomes a version of the registered model ``<prefix>-<step>`` whose source is the
MLflow model the step was logged as (``models:/<model id>``, see ``pipelines.models``: the DiT and
the student are pyfunc generators, loadable with ``mlflow.pyfunc.load_model`` and servable with
``mlflow models serve``), tagged with the workflow id, step, cache key and manifest URI, the evaluate step's
metrics (``eval.<name>``) and an ``evaluator`` digest (the evaluate step's config). A component
whose cache key already has a version (nothing re-ran) reuses it.

Gate: the workflow's DiT version becomes ``champion`` (with every component of the same workflow)
when its ``gate_metric`` beats the current champion's by ``margin`` on the same evaluator, or when
there is no champion. The decision and both numbers go to the workflow's MLflow run either way
(tags ``latentflow.promotion*`` and ``promotion.json``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from components.common.step import Manifest, canonical_json
from pipelines.config import PipelineConfig

REGISTERED_STEPS = ("autoencoder", "dit", "distill")  # plus every superres_k
CHAMPION = "champion"
GATE_STEP = "dit"


@dataclass
class Decision:
    promoted: bool
    reason: str
    metric: str
    new: float | None
    champion: float | None
    champion_version: str | None
    versions: dict[str, str]  # registered model name -> version of this workflow


def model_name(cfg: PipelineConfig, step: str) -> str:
    return f"{cfg.registry.model_prefix or cfg.name}-{step}"


def evaluator_digest(evaluate: Manifest | None) -> str:
    """Which evaluator produced the numbers: only numbers from the same one are compared."""
    if evaluate is None:
        return "none"
    return hashlib.sha256(canonical_json(evaluate.config).encode()).hexdigest()[:16]


def register(client, cfg: PipelineConfig, workflow_id: str, manifests: dict[str, Manifest]) -> dict[str, Any]:
    """{model name: ModelVersion} of this workflow's trained components."""
    from mlflow.exceptions import MlflowException

    from pipelines.models import ensure_logged

    evaluate = manifests.get("evaluate")
    metrics = {f"eval.{k}": repr(float(v)) for k, v in (evaluate.metrics if evaluate else {}).items()
               if not k.startswith("sample_accuracy_class")}
    versions = {}
    for step, manifest in manifests.items():
        if step not in REGISTERED_STEPS and not step.startswith("superres_"):
            continue
        name = model_name(cfg, step)
        try:
            client.create_registered_model(name, tags={"latentflow.step": step, "latentflow.pipeline": cfg.name})
        except MlflowException:
            pass  # already registered
        existing = client.search_model_versions(f"name='{name}' and tag.`latentflow.cache_key`='{manifest.cache_key}'")
        if existing:
            versions[name] = max(existing, key=lambda v: int(v.version))
            continue
        model_id = ensure_logged(client, manifest, manifests)
        tags = {"latentflow.workflow_id": workflow_id, "latentflow.step": step,
                "latentflow.cache_key": manifest.cache_key, "latentflow.manifest_uri": manifest.uri("manifest.json"),
                "latentflow.evaluator": evaluator_digest(evaluate), **metrics}
        versions[name] = client.create_model_version(name, source=f"models:/{model_id}", run_id=manifest.mlflow_run_id,
                                                     tags=tags, model_id=model_id)
    return versions


def decide(cfg: PipelineConfig, new_version, champion) -> tuple[bool, str, float | None, float | None]:
    gate = cfg.registry
    key = f"eval.{gate.gate_metric}"
    new = float(new_version.tags[key]) if key in new_version.tags else None
    if new is None:
        return False, f"this workflow has no {gate.gate_metric} (no evaluate step?)", None, None
    if champion is None:
        return True, "no champion yet", new, None
    if champion.version == new_version.version:
        return False, "already the champion (nothing re-ran)", new, new
    old = float(champion.tags[key]) if key in champion.tags else None
    if champion.tags.get("latentflow.evaluator") != new_version.tags.get("latentflow.evaluator"):
        return False, "the champion was scored by another evaluator; not comparable", new, old
    if old is None:
        return True, f"the champion has no {gate.gate_metric}", new, None
    gain = (new - old) if gate.gate_mode == "max" else (old - new)
    if gain > gate.margin:
        return True, f"{gate.gate_metric} {new:.4g} beats {old:.4g} by more than {gate.margin:g}", new, old
    return False, f"{gate.gate_metric} {new:.4g} does not beat {old:.4g} by more than {gate.margin:g}", new, old


def promote(cfg: PipelineConfig, tracking_uri: str, workflow_id: str, manifests: dict[str, Manifest],
            parent_run_id: str | None) -> Decision:
    from mlflow.exceptions import MlflowException

    from components.common.tracking import StepTracker, client_for

    client = client_for(tracking_uri)
    versions = register(client, cfg, workflow_id, manifests)
    gate_name = model_name(cfg, GATE_STEP)
    if gate_name not in versions:
        decision = Decision(False, "no dit step: nothing to promote", cfg.registry.gate_metric, None, None, None,
                            {n: v.version for n, v in versions.items()})
    else:
        try:
            champion = client.get_model_version_by_alias(gate_name, CHAMPION)
        except MlflowException:
            champion = None
        promoted, reason, new, old = decide(cfg, versions[gate_name], champion)
        if promoted:
            for name, version in versions.items():
                client.set_registered_model_alias(name, CHAMPION, version.version)
        decision = Decision(promoted, reason, cfg.registry.gate_metric, new, old,
                            champion.version if champion else None, {n: v.version for n, v in versions.items()})
    tracker = StepTracker(tracking_uri, parent_run_id)
    tracker.set_tags({"latentflow.promotion": "promoted" if decision.promoted else "kept",
                      "latentflow.promotion_reason": decision.reason})
    tracker.log_dict(asdict(decision), "promotion.json")
    return decision


def resolve_model(tracking_uri: str, model_uri: str) -> tuple[str, dict[str, str]]:
    """(source location, tags) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from components.common.warm_start import resolve_registered

    version = resolve_registered(tracking_uri, model_uri)
    if version is None:
        raise ValueError(f"{model_uri}: not in the registry at {tracking_uri}")
    return version.source, dict(version.tags)


def decision_json(decision: Decision) -> str:
    return json.dumps(asdict(decision), indent=2)
