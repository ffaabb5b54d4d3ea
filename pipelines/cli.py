"""``latentflow``: run, plan and inspect latent diffusion pipelines.

This module holds the app, what every invocation sets up (redaction, the version), and the
commands that run or plan a pipeline; ``sample`` (``cli_sample``), ``inspect`` and ``runs``
(``cli_history``), and ``submit`` and ``jobs`` (``cli_jobs``) are registered from their modules,
in the order ``--help`` lists them."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from components.common.redact import install_log_redaction, install_output_redaction, redact_text
from components.common.s3_access import s3_credentials_available
from components.common.storage import Storage, StorageError
from components.common.tracking import TrackingConfigError
from pipelines.cli_history import inspect, runs
from pipelines.cli_jobs import jobs_app, submit
from pipelines.cli_sample import sample
from pipelines.cli_shared import (CONFIG_HELP, JSON_HELP, SET_HELP, STATUS_STYLE, VERBOSE_HELP, RedactingConsole,
                                  console, err, key_prefix, load)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distributed latent diffusion training pipelines on Ray, DeepSpeed and MLflow.",
)


def redacted_excepthook(exc_type, exc, tb) -> None:
    """An unexpected error's traceback, redacted (its message may quote a URL with credentials)."""
    sys.stderr.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("latentflow")
    except PackageNotFoundError:  # a checkout run as `python -m pipelines.cli`, never installed
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def _print_version(value: bool) -> None:
    if value:
        print(f"latentflow {package_version()}")
        raise typer.Exit()


@app.callback()
def _redact_this_process(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print latentflow's version and exit."),
) -> None:
    # A callback, not main(): the `latentflow` console script calls `app` directly. It runs after
    # typer installs its own excepthook, so ours replaces it (typer's folds long lines before any
    # redaction could see them whole).
    from components.common.tracking import telemetry_off_unless_asked

    telemetry_off_unless_asked()
    install_log_redaction()
    install_output_redaction()  # what bypasses logging: MLflow's "View run at <URI>", Ray's worker lines
    sys.excepthook = redacted_excepthook

@app.command()
def run(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    workflow_id: Optional[str] = typer.Option(
        None, "--workflow-id", help="Resume or name a workflow; finished steps are reused. Default: generated."),
    only: Optional[str] = typer.Option(
        None, "--only", help="Run only these steps (comma-separated, e.g. dit,superres_1) and the steps they "
                             "need; the rest of the pipeline is left out."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Run a pipeline (or resume one): steps whose inputs and config are unchanged come from cache."""
    run_and_report(load(config, set_), workflow_id, [s.strip() for s in only.split(",") if s.strip()] if only else None,
                   verbose)


@app.command()
def retrain(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    workflow_id: Optional[str] = typer.Option(None, "--workflow-id", help="Name the workflow. Default: generated."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="As for `run`."),
):
    """What a schedule runs as new data lands: the pipeline, where the shard step's cache key holds a
    fingerprint of the source (file listing with sizes and modification times, or S3 ETags), so an
    unchanged source re-runs nothing and new or changed images re-run the data step and everything
    downstream. Then every trained component is registered in the MLflow Model Registry, and the
    promotion gate moves the alias `champion` to this workflow's models only if its evaluation beats
    the champion's (config `registry`: gate_metric, gate_mode, margin); the decision is logged."""
    from components.common.tracking import resolve_tracking
    from dataclasses import asdict

    from pipelines.workflow_history import record_manifest
    from pipelines.registry import promote

    cfg = load(config, set_)
    result = run_and_report(cfg, workflow_id, verbose=verbose)
    root_uri = Storage.from_uri(cfg.storage.root).uri()
    manifests = {}
    for record in result.steps:
        manifest = record_manifest(root_uri, asdict(record))
        if manifest is not None:
            manifests[record.name] = manifest
    uri, _ = resolve_tracking(cfg.tracking.uri, Storage.from_uri(cfg.storage.root).uri())
    decision = promote(cfg, uri, result.workflow_id, manifests, result.parent_run_id)
    versions = ", ".join(f"{name} v{version}" for name, version in decision.versions.items())
    console.print(escape(f"registered: {versions or 'nothing'}"), soft_wrap=True)
    console.print(escape(f"promotion gate: {'PROMOTED to champion' if decision.promoted else 'kept the champion'}: "
                         f"{decision.reason}"), soft_wrap=True)


def run_with_view(cfg, workflow_id: str, only: list[str] | None, log_file, verbose: bool):
    """run_pipeline with the driver's output in ``log_file`` and the live view on the terminal."""
    from pipelines.console import WorkflowView, driver_output_to
    from pipelines.runtime import run_pipeline

    with driver_output_to(log_file.local, verbose) as (out, errs):
        width = None if out.isatty() else 160
        view = WorkflowView(Console(file=out, highlight=False, width=width),
                            RedactingConsole(file=errs, highlight=False, width=width), live=out.isatty() and not verbose)
        try:
            with view.showing(workflow_id):
                return run_pipeline(cfg, workflow_id, view.event, only)
        finally:
            disconnect_ray()  # what Ray still forwards from workers goes to the log, not after the table


def disconnect_ray() -> None:
    ray = sys.modules.get("ray")  # a fully cached run never imported it
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def run_and_report(cfg, workflow_id: str | None, only: list[str] | None = None, verbose: bool = False):
    from pipelines.console import WorkflowLog
    from pipelines.latent_diffusion import build_workflow
    from pipelines.runtime import new_workflow_id

    if only:
        try:
            build_workflow(cfg).restricted_to(only)
        except ValueError as e:  # --only names no step of the pipeline
            err.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2)

    workflow_id = workflow_id or new_workflow_id()
    root = Storage.from_uri(cfg.storage.root)
    log_file = WorkflowLog(root, workflow_id)
    console.print(f"workflow id: [bold]{workflow_id}[/]")
    console.print(f"storage:     {root.uri()}")
    console.print(escape(f"log:         {log_file.where()}" + ("" if verbose else " (-v: show it here too)")),
                  soft_wrap=True)
    t0 = time.monotonic()
    from pipelines.runner import WorkflowInterrupted

    try:
        result, summary_uri = run_with_view(cfg, workflow_id, only, log_file, verbose)
    except (StorageError, TrackingConfigError) as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1)
    except WorkflowInterrupted as e:
        err.print(f"[bold red]stopped by {e.signal_name}[/]: the finished steps are kept; resume with "
                  f"--workflow-id {workflow_id}", soft_wrap=True)
        raise typer.Exit(130 if e.signal_name == "SIGINT" else 143)
    finally:
        if (problem := log_file.publish()) is not None:
            err.print(f"[yellow]warning:[/] {escape(problem)}", soft_wrap=True)

    table = Table(title=f"workflow {workflow_id} ({time.monotonic() - t0:.1f}s)")
    for column in ("step", "status", "duration", "cache key", "mlflow run"):
        table.add_column(column)
    for r in result.steps:
        style = STATUS_STYLE.get(r.status, "white")
        table.add_row(r.name, f"[{style}]{r.status}[/]", f"{r.duration_s:.1f}s",
                      key_prefix(r.cache_key), r.mlflow_run_id or "-")
    console.print(table)
    console.print(f"summary: {summary_uri}")
    if not result.ok:
        failed = [r for r in result.steps if r.status == "failed"]
        for r in failed:
            err.print(f"[bold red]step {r.name!r} failed:[/] {r.error}")
        raise typer.Exit(1)
    return result


@app.command()
def plan(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json_: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Validate a config and print its steps in order, their resources, and whether each would run
    or come from cache. Runs nothing and starts no training."""
    from pipelines.workflow_history import as_json
    from pipelines.latent_diffusion import build_workflow

    cfg = load(config, set_)
    workflow = build_workflow(cfg)
    root = Storage.from_uri(cfg.storage.root)
    records, unreadable = plan_records(workflow, root)
    rows = [plan_row(s, records.get(s.name)) for s in workflow.steps]
    if as_json_:
        print(as_json({"pipeline": cfg.name, "storage": root.uri(), "cache_checked": bool(records), "steps": rows}))
    else:
        print_plan(f"pipeline {cfg.name}: {len(rows)} steps, storage {root.uri()}", rows)
    if unreadable is not None:
        err.print(f"[bold red]error:[/] cannot read the cache, so cannot tell what would run: {escape(str(unreadable))}",
                  soft_wrap=True)
        raise typer.Exit(1)


def plan_records(workflow, root: Storage) -> tuple[dict, StorageError | None]:
    """Each step's plan record by name ({} when the cache cannot be checked from here), and the
    error that made the storage unreadable, if one did."""
    from pipelines.workflow import plan as plan_steps

    if not root.is_local and not s3_credentials_available():  # validating a recipe away from its cluster
        err.print(f"[yellow]cannot check the cache (no AWS credentials in this environment to read "
                  f"{root.uri()}); showing the DAG only[/]")
        return {}, None
    try:
        return {r.name: r for r in plan_steps(workflow, root)}, None
    except StorageError as e:  # unreadable is not "absent": say so, and fail, after the DAG
        return {}, e


def plan_row(step, record) -> dict:
    """One step of the plan, as --json prints it; ``would`` is None where the cache was not read."""
    return {"step": step.name, "inputs": list(step.inputs), "resources": step.config.resources.model_dump(mode="json"),
            "would": {"cached": "cache", "would_run": "run"}.get(record.status) if record else None,
            "cache_key": record.cache_key if record else None, "note": record.note if record else None}


def print_plan(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for column in ("#", "step", "inputs", "resources", "would", "cache key"):
        table.add_column(column)
    for i, row in enumerate(rows, 1):
        res = row["resources"]
        resources = (f"cpu={res['num_cpus']:g} gpu={res['num_gpus']:g} workers={res['num_workers']}"
                     f"×(cpu={res['cpus_per_worker']:g}, gpu={res['gpus_per_worker']:g}) retries={res['max_retries']}")
        would = {"cache": "[cyan]cache[/]", "run": "[green]run[/]"}.get(row["would"], "?")
        table.add_row(str(i), row["step"], ", ".join(row["inputs"]) or "-", resources, would, key_prefix(row["cache_key"]))
    console.print(table)
    for row in rows:
        if row["note"]:
            console.print(escape(f"  {row['step']}: {row['note']}"), soft_wrap=True)


for command in (sample, inspect, runs, submit):
    app.command()(command)
app.add_typer(jobs_app, name="jobs")


def main() -> None:  # pragma: no cover - console entry when run as a module
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
