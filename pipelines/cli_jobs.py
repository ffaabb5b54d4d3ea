"""``latentflow submit`` and ``latentflow jobs``: the pipeline as a Ray job on a cluster, and the
jobs there (the job server's client: ``pipelines.jobs``)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipelines.cli_shared import CONFIG_HELP, JSON_HELP, SET_HELP, console, err, load


ADDRESS_HELP = ("The Ray job server (the head's dashboard), e.g. http://127.0.0.1:8265. "
                "Default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as `ray job submit`).")


def job_server(address: str | None) -> str:
    from pipelines.jobs import NoAddress, resolve_address

    try:
        return resolve_address(address)
    except NoAddress as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2)


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
