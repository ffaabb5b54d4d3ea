"""``latentflow inspect`` and ``latentflow runs``: a workflow's steps, and the workflows under a
storage root, as tables or JSON (the views themselves: ``pipelines.workflow_history``)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from components.common.storage import StorageError
from pipelines.cli_shared import JSON_HELP, console, err, status_markup


def inspect(
    workflow_id: str = typer.Argument(..., help="The workflow (see `latentflow run` or `latentflow runs`)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="The pipeline's storage root. Default: search "
                                                                   "./outputs/workflows/ID and ./outputs/*/workflows/ID."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI. Default: "
                                               "MLFLOW_TRACKING_URI, else the root's embedded mlflow.db."),
    as_json_: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Each step of a workflow: status, cached or ran, duration, key metrics, artifact URIs, its MLflow run."""
    from pipelines.workflow_history import as_json, inspect_workflow
    from pipelines.sample import SampleError

    try:
        view = inspect_workflow(workflow_id, storage, tracking_uri)
    except (SampleError, StorageError) as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1)
    if as_json_:
        print(as_json(view))
        return
    table = Table(title=escape(f"workflow {view['workflow_id']} ({view['pipeline']}): {view['status']}, "
                               f"{view['started_at']} -> {view['ended_at']}"))
    for column in ("step", "status", "duration", "key metrics", "mlflow run", "artifacts"):
        table.add_column(column)
    for s in view["steps"]:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in (s.get("metrics") or {}).items())
        run = f"{s['mlflow_run_id'] or '-'} {s.get('mlflow_status', '')}".strip()
        duration = f"{s['duration_s']:.1f}s" if s.get("duration_s") is not None else "-"
        table.add_row(s["step"], status_markup(s["status"]), duration, escape(metrics), run,
                      str(s.get("artifact_count", 0)))
    console.print(table)
    for s in view["steps"]:
        if s.get("location"):
            console.print(escape(f"{s['step']}: {s['location']} ({s['artifact_count']} files)"), soft_wrap=True)
        if s.get("error"):
            err.print(escape(f"{s['step']} failed: {s['error']}"), soft_wrap=True)
    for v in view["registered_models"]:
        aliases = f" @{', @'.join(v['aliases'])}" if v["aliases"] else ""
        console.print(escape(f"registered: {v['name']} v{v['version']}{aliases}"), soft_wrap=True)
    console.print(escape(f"MLflow: {view['tracking_uri'] or 'not reachable from here'}; parent run "
                         f"{view['mlflow_parent_run_id']}"), soft_wrap=True)


def runs(
    storage: Optional[str] = typer.Option(None, "--storage", help="The pipeline's storage root (local or s3://). "
                                          "Default: every root under ./outputs and ./outputs/* (the presets' "
                                          "storage.root, the demo's ./outputs/mnist included)."),
    as_json_: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Recent workflows under a storage root with their outcome, newest first."""
    from pipelines.workflow_history import as_json, list_workflows

    try:
        rows = list_workflows(storage)
    except StorageError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1)
    if storage is None and not rows:
        err.print("no workflows under ./outputs or ./outputs/*; pass --storage ROOT (the pipeline's storage.root)")
    if as_json_:
        print(as_json(rows))
        return
    roots = storage or ", ".join(sorted({r["storage"] for r in rows})) or "./outputs"
    table = Table(title=escape(f"workflows under {roots}"))
    for column in ("workflow id", "pipeline", "status", "started", "ended", "ran", "cached", "failed"):
        table.add_column(column)
    for r in rows:
        table.add_row(escape(str(r["workflow_id"])), escape(str(r["pipeline"])), status_markup(r["status"]),
                      str(r["started_at"]), str(r["ended_at"]), str(r["ran"]), str(r["cached"]), str(r["failed"]))
    console.print(table)
