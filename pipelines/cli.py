"""``latentflow``: run, plan and inspect latent diffusion pipelines."""

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

from components.common.config import ConfigError
from components.common.redact import install_log_redaction, install_output_redaction, redact_text
from components.common.s3_access import s3_credentials_available
from components.common.step import IntegrityError
from components.common.storage import Storage, StorageError
from components.common.tracking import TrackingConfigError
from pipelines.console import STATE_STYLE as STATUS_STYLE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distributed latent diffusion training pipelines on Ray, DeepSpeed and MLflow.",
)


class RedactingConsole(Console):
    """Errors quote what failed (a tracking URI with its password, a config value): every string
    printed here is redacted before rich wraps it, since a URL folded across two lines would slip
    past the redacting stdout/stderr underneath."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*(redact_text(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Piped output (CI logs, `| tee`) gets a wide table instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = RedactingConsole(stderr=True, highlight=False)


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

CONFIG_HELP = "Pipeline config YAML, e.g. configs/pipeline/mnist.yaml."
SET_HELP = ("Override a config value, typed like its field: --set dit.optimizer.lr=1e-4 (repeatable). "
            "Order, last wins: the config file, then MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME "
            "(tracking.uri, tracking.experiment), then --set.")
VERBOSE_HELP = ("Also show what Ray, the workers, DeepSpeed and MLflow print (always kept in the workflow's "
                "log file, workflows/<id>/logs/ under the storage root).")
JSON_HELP = "Print one JSON document on stdout instead of tables (messages go to stderr)."



def load(config: str, overrides: list[str]):
    from pipelines.config import load_pipeline_config

    try:
        return load_pipeline_config(config, overrides)
    except ConfigError as e:
        err.print(f"[bold red]config error[/]\n{e}")
        raise typer.Exit(2)


def key_prefix(key: str | None) -> str:
    return key[:12] if key else "-"


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


@app.command()
def sample(
    workflow_id: Optional[str] = typer.Option(None, "--workflow-id", help="The workflow whose DiT samples (see `latentflow run`)."),
    model: Optional[str] = typer.Option(None, "--model", help="Instead of --workflow-id: a registered DiT or "
                                        "distilled student, models:/NAME@champion or models:/NAME/VERSION."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="--model: the registry's MLflow URI. "
                                               "Default: MLFLOW_TRACKING_URI."),
    labels: str = typer.Option(..., "--labels", help="Comma-separated class indices or class names, e.g. 0,1,2."),
    per_label: int = typer.Option(..., "--per-label", min=1, help="Images per label."),
    out: str = typer.Option(..., "--out", help="Output folder: OUT/<label>/<index>.png and OUT/grid.png (a row per label)."),
    storage: Optional[str] = typer.Option(
        None, "--storage", help="The pipeline's storage root (local path or s3://). "
                                "Default: search ./outputs/workflows/ID and ./outputs/*/workflows/ID."),
    step: str = typer.Option(
        "dit", "--step", help="dit: the DiT's images; distill: the distilled student's, with its native steps "
                              "(guidance is folded into it); cascade: the base images through every "
                              "super-resolution stage of the workflow (written at the final resolution)."),
    base: str = typer.Option("dit", "--base", help="cascade: the base sampler, dit or distill (the student)."),
    sampler: Optional[str] = typer.Option(
        None, "--sampler", help="ddim, ddpm, langevin (annealed Langevin dynamics) or pc (predictor-corrector). "
                                "Default: the DiT step's setting."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps. Default: the DiT step's setting "
                                                              "(distill: the student's native steps)."),
    guidance: Optional[float] = typer.Option(
        None, "--guidance", help="Classifier-free guidance weight w (0: none). Default: the DiT step's setting."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta in [0, 1] (0: deterministic). Default: the DiT step's setting."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Noise seed; the same seed gives the same images. Default: the DiT step's setting."),
    snr: Optional[float] = typer.Option(
        None, "--snr", help="langevin, pc: signal-to-noise ratio r of the Langevin step size "
                            "2(1-beta_t)(r|z|/|score|)^2. Default: the DiT step's setting (0.16)."),
    corrector_steps: Optional[int] = typer.Option(
        None, "--corrector-steps", help="pc: Langevin corrector steps at each noise level (0: predictor only). "
                                        "Default: the DiT step's setting (1)."),
    pc_predictor: Optional[str] = typer.Option(
        None, "--pc-predictor", help="pc: ancestral (DDPM's step, right on coarse grids) or reverse_diffusion "
                                     "(the paper's, wants ~100+ steps). Default: the DiT step's setting (ancestral)."),
    langevin_steps: Optional[int] = typer.Option(
        None, "--langevin-steps", help="langevin: Langevin steps per noise level (model calls: steps x this + 1). "
                                       "Default: the DiT step's setting (5)."),
    langevin_step_size: Optional[float] = typer.Option(
        None, "--langevin-step-size", help="langevin: classic step size rule c(1-alphabar_t) with this c, instead "
                                           "of --snr. Default: the DiT step's setting (none: the snr rule)."),
    classifier_guidance: Optional[float] = typer.Option(
        None, "--classifier-guidance", help="Classifier guidance weight w with the workflow's noisy_classifier step "
                                            "(Dhariwal & Nichol): alone with --guidance 0, or on top of "
                                            "classifier-free guidance. Default: the DiT step's setting (0: none)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass (does not change the images)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    sr_sampler: Optional[str] = typer.Option(None, "--sr-sampler", help="cascade: ddim or ddpm for every SR stage. "
                                                                      "Default: each stage's setting."),
    sr_steps: Optional[int] = typer.Option(None, "--sr-steps", help="cascade: denoising steps of every SR stage."),
    sr_guidance: Optional[float] = typer.Option(None, "--sr-guidance",
                                                help="cascade: guidance of class-conditional SR stages."),
    sr_aug_level: Optional[float] = typer.Option(
        None, "--sr-aug-level", help="cascade: conditioning augmentation level in [0, 1] (fraction of the stage's "
                                     "schedule) at every hand-off."),
    sr_handoff: Optional[str] = typer.Option(
        None, "--sr-handoff", help="cascade: non_truncated (finish the stage below, then noise its output) or "
                                   "truncated (stop the stage below at the level; SR-to-SR hand-offs only)."),
):
    """Generate images with a finished workflow's DiT and autoencoder (and, with --step cascade, its
    super-resolution stages) and write them as PNG files."""
    from pipelines.sample import BadFlag, SampleError, sample as sample_images

    if (workflow_id is None) == (model is None):
        err.print("[bold red]error:[/] give --workflow-id or --model (one of them)")
        raise typer.Exit(2)
    try:
        result = sample_images(workflow_id, labels, per_label, out, storage=storage, step=step, base=base, sampler=sampler,
                               steps=steps, guidance=guidance, eta=eta, seed=seed, batch_size=batch_size,
                               device=device, sr_overrides={"sampler": sr_sampler, "steps": sr_steps,
                                                            "guidance": sr_guidance, "aug_level": sr_aug_level,
                                                            "handoff": sr_handoff},
                               model=model, tracking_uri=tracking_uri,
                               sampler_options={k: v for k, v in {
                                   "snr": snr, "corrector_steps": corrector_steps, "pc_predictor": pc_predictor,
                                   "langevin_steps": langevin_steps, "langevin_step_size": langevin_step_size,
                                   "classifier_guidance": classifier_guidance,
                               }.items() if v is not None})
    except BadFlag as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2)
    except (SampleError, StorageError, IntegrityError) as e:  # IntegrityError: a file changed after it was written
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1)
    s = result.sampling
    names = ", ".join(result.classes[i] for i in result.labels)
    langevin_rule = f"step size {s.langevin_step_size:g}" if s.langevin_step_size else f"snr {s.snr:g}"
    score_settings = {"pc": f", {s.pc_predictor} predictor, {s.corrector_steps} corrector steps, snr {s.snr:g}",
                      "langevin": f", {s.langevin_steps} steps per level, {langevin_rule}"}.get(s.sampler, "")
    if s.classifier_guidance:
        score_settings += f", classifier guidance {s.classifier_guidance:g}"
    console.print(escape(f"{workflow_id or model}: {len(result.files) - 1} images of {names} "
                         f"({s.sampler}, {s.steps} steps, guidance {s.guidance:g}, eta {s.eta:g}, seed {s.seed}"
                         f"{score_settings})"),
                  soft_wrap=True)
    console.print(escape(f"wrote {result.out}/<label>/<index>.png and {result.out / 'grid.png'}"), soft_wrap=True)


@app.command()
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


@app.command()
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


def status_markup(status: str | None) -> str:
    style = STATUS_STYLE.get(status or "", {"succeeded": "green"}.get(status or "", "white"))
    return f"[{style}]{status}[/]"


ADDRESS_HELP = ("The Ray job server (the head's dashboard), e.g. http://127.0.0.1:8265. "
                "Default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as `ray job submit`).")


def job_server(address: str | None) -> str:
    from pipelines.jobs import NoAddress, resolve_address

    try:
        return resolve_address(address)
    except NoAddress as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2)


@app.command()
def submit(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    workflow_id: Optional[str] = typer.Option(None, "--workflow-id", help="Name the workflow. Default: generated."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Stream the job's logs until it ends and exit with "
                                                             "its outcome (--no-wait: print its id and return)."),
):
    """Submit `latentflow run CONFIG` as a Ray job, with this repository as its working_dir and the
    config's ray.runtime_env. The job runs with the cluster's environment, not this shell's: its
    MLFLOW_TRACKING_URI is the cluster's; choose another with --set tracking.uri=..."""
    from pipelines.jobs import JobError, follow, submit as submit_job

    cfg = load(config, set_)  # a bad config fails here, not on the cluster
    server = job_server(address)
    try:
        submission_id = submit_job(server, config, set_, workflow_id, cfg.ray.runtime_env)
    except JobError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"submission id: {submission_id}")
    if not wait:
        flag = f" --address {address}" if address else ""  # else the same variables name it again
        console.print(f"follow it with: latentflow jobs logs {submission_id} --follow{flag}", soft_wrap=True)
        return
    outcome = _jobs_call(follow, server, submission_id, lambda text: print(text, end="", flush=True))
    console.print(f"job {submission_id}: {outcome}")
    if outcome != "SUCCEEDED":
        raise typer.Exit(1)


jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: list, status, logs, stop.")
app.add_typer(jobs_app, name="jobs")


def _jobs_call(fn, *args):
    from pipelines.jobs import JobError

    try:
        return fn(*args)
    except JobError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
              as_json_: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Every job the cluster knows, newest first."""
    from pipelines.workflow_history import as_json
    from pipelines.jobs import list_jobs

    server = job_server(address)
    rows = _jobs_call(list_jobs, server)
    if as_json_:
        print(as_json(rows))
        return
    table = Table(title=escape(f"jobs at {server}"))
    for column in ("submission id", "status", "workflow id", "entrypoint"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["submission_id"] or "-", row["status"], row["workflow_id"] or "-", escape(row["entrypoint"]))
    console.print(table)


@jobs_app.command("status")
def jobs_status(submission_id: str = typer.Argument(...),
                address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from pipelines.jobs import status

    console.print(_jobs_call(status, job_server(address), submission_id))


@jobs_app.command("logs")
def jobs_logs(submission_id: str = typer.Argument(...),
              address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
              follow_: bool = typer.Option(False, "--follow", help="Keep streaming until the job ends.")):
    """The job's driver logs."""
    from pipelines.jobs import follow, logs

    if follow_:
        _jobs_call(follow, job_server(address), submission_id, lambda text: print(text, end="", flush=True))
    else:
        print(_jobs_call(logs, job_server(address), submission_id), end="")


@jobs_app.command("stop")
def jobs_stop(submission_id: str = typer.Argument(...),
              address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """Ask the cluster to stop a job."""
    from pipelines.jobs import stop

    stopped = _jobs_call(stop, job_server(address), submission_id)
    console.print(f"job {submission_id}: {'stop requested' if stopped else 'already finished'}")


def main() -> None:  # pragma: no cover - console entry when run as a module
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
