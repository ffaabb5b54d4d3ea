"""``latentflow inspect`` and ``latentflow runs``: what a workflow did, from its id alone.

Everything comes from storage (the workflow's ``summary.json`` and each step's manifest) and, when
the tracking store is reachable, from MLflow (each step run's status and logged artifacts). The
tracking store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite
database a local storage root keeps (``<root>/mlflow.db``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from components.common.step import Manifest
from components.common.storage import Storage, StorageError
from pipelines.sample import SampleError, find_summary, local_roots, parse_summary

# the metrics worth a glance per step; the manifest keeps all of them
KEY_METRICS = {
    "shard": ("num_train", "num_val", "num_skipped"),
    "autoencoder": ("val_psnr", "scale_factor", "images_per_s"),
    "latents": (),
    "dit": ("loss", "images_per_s", "steps"),
    "distill": ("native_steps", "round_1_loss", "loss"),
    "evaluate": ("sample_accuracy", "frechet_distance", "cascade_sample_accuracy", "student_4step_sample_accuracy"),
}
SR_METRICS = ("psnr", "psnr_degraded_input", "ssim")
MAX_FILES = 8  # artifact URIs listed per step (shard steps write many .tar files)


def tracking_uri(root_uri: str, given: str | None) -> str | None:
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not root_uri.startswith("s3://") and os.path.isfile(os.path.join(root_uri, "mlflow.db")):
        return f"sqlite:///{os.path.abspath(os.path.join(root_uri, 'mlflow.db'))}"
    return None


def record_manifest(root_uri: str, record: dict) -> Manifest | None:
    """The manifest a summary record points at, found relative to the root the summary was read
    from (so a moved root still answers); None when the step left none or it is unreadable."""
    from components.common.step import ManifestInvalid, read_manifest_at

    path = record.get("manifest_path")
    uri = f"{root_uri.rstrip('/')}/{path}" if path else record.get("manifest_uri")
    if not uri:
        return None
    try:
        return read_manifest_at(uri)
    except (StorageError, ManifestInvalid):
        return None


def step_view(record: dict, client, root_uri: str) -> dict[str, Any]:
    name = record.get("name", "?")
    view = {"step": name, "status": record.get("status"), "cached": record.get("status") == "cached",
            "duration_s": record.get("duration_s"), "cache_key": record.get("cache_key"),
            "manifest_uri": record.get("manifest_uri"), "mlflow_run_id": record.get("mlflow_run_id"),
            "error": record.get("error")}
    manifest = record_manifest(root_uri, record)
    if manifest is not None:
        wanted = SR_METRICS if name.startswith("superres_") else KEY_METRICS.get(name, ())
        view["metrics"] = {k: manifest.metrics[k] for k in wanted if k in manifest.metrics}
        files = [f.path for f in manifest.files]
        view["location"] = manifest.output_uri
        view["artifacts"] = [manifest.uri(p) for p in files[:MAX_FILES]]
        view["artifact_count"] = len(files)
        view["produced_by_run"] = manifest.mlflow_run_id
    if client is not None and view["mlflow_run_id"]:
        try:
            run = client.get_run(view["mlflow_run_id"])
            view["mlflow_status"] = run.info.status
            view["mlflow_artifacts"] = sorted(a.path for a in client.list_artifacts(run.info.run_id))
        except Exception as e:  # noqa: BLE001 - a deleted run or an unreachable server: say so, go on
            view["mlflow_status"] = f"unavailable: {type(e).__name__}"
    return view


def inspect_workflow(workflow_id: str, storage: str | None = None, tracking: str | None = None) -> dict[str, Any]:
    summary_uri, summary = find_summary(workflow_id, storage)
    root_uri = summary_uri.rsplit("/workflows/", 1)[0]
    uri = tracking_uri(root_uri, tracking)
    client = None
    if uri:
        from components.common.tracking import client_for

        client = client_for(uri)
    return {"workflow_id": summary.get("workflow_id"), "pipeline": summary.get("pipeline"),
            "status": summary.get("status"), "started_at": summary.get("started_at"),
            "ended_at": summary.get("ended_at"), "summary_uri": summary_uri, "tracking_uri": uri,
            "mlflow_parent_run_id": summary.get("mlflow_parent_run_id"),
            "registered_models": registered_versions(client, summary["steps"]),
            "steps": [step_view(record, client, root_uri) for record in summary["steps"]]}


def registered_versions(client, steps: list[dict]) -> list[dict[str, Any]]:
    """The registry's versions of the models this workflow's steps hold (matched by cache key,
    whichever ``latentflow retrain`` registered them), with their aliases."""
    if client is None:
        return []
    found = []
    for step in steps:
        if not step.get("cache_key"):
            continue
        try:
            found += client.search_model_versions(f"tag.`latentflow.cache_key` = '{step['cache_key']}'")
        except Exception:  # noqa: BLE001 - a store without a registry, an unreachable server
            return []
    # search results leave aliases out: read each version itself
    versions = [client.get_model_version(v.name, v.version) for v in found]
    return sorted(({"name": v.name, "version": v.version, "step": v.tags.get("latentflow.step"),
                    "aliases": sorted(v.aliases or []), "source": v.source} for v in versions),
                  key=lambda v: (v["name"], int(v["version"])))


def list_workflows(storage: str | None = None, search_base: str | os.PathLike = ".") -> list[dict[str, Any]]:
    """Every workflow under the storage root, newest first; None: under every root that ``inspect``
    and ``sample`` search without --storage (the demo's ./outputs/mnist among them)."""
    roots = [storage] if storage is not None else local_roots(search_base)
    rows = [row for root in roots for row in workflows_under(Storage.from_uri(root))]
    return sorted(rows, key=lambda r: r["started_at"] or "", reverse=True)


def workflows_under(root: Storage) -> list[dict[str, Any]]:
    rows = []
    for rel in root.list("workflows"):
        if not rel.endswith("/summary.json"):
            continue
        try:
            summary = parse_summary(root.read_text(rel), root.uri(rel))
        except (SampleError, StorageError):
            continue
        statuses = [s.get("status") for s in summary["steps"]]
        rows.append({"workflow_id": summary.get("workflow_id"), "pipeline": summary.get("pipeline"),
                     "status": summary.get("status"), "started_at": summary.get("started_at"),
                     "ended_at": summary.get("ended_at"), "storage": root.uri(),
                     **{status: statuses.count(status) for status in ("ran", "cached", "failed")}})
    return rows


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
