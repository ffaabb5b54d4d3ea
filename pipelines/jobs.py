"""Ray job submission: ``latentflow submit`` sends ``latentflow run CONFIG …`` to a cluster's job
server (the dashboard, port 8265) with this repository as the job's ``working_dir``, and
``latentflow jobs`` lists, inspects, tails and stops jobs, all through Ray's ``JobSubmissionClient``.

The job's runtime environment is the config's ``ray.runtime_env`` (pip packages, env vars, ...)
plus the working directory, minus what must not travel: outputs, virtual environments, caches,
git metadata. Inside the job RAY_ADDRESS is set, so ``latentflow run`` joins the cluster it runs on.

Secrets never travel in a job: the cluster stores its runtime_env and entrypoint and shows them in
the dashboard and ``ray job list``. A secret-looking env var in ``ray.runtime_env`` (by name or by
value, ``components.common.redact``) or a ``--set`` that carries one is refused, naming the key:
the job gets its secrets from the cluster's own environment, which its driver and workers inherit
(the ``latentflow-aws`` secretRef in infra/kuberay, or the environment of ``ray start``). Refused
rather than dropped: a job silently missing a variable it was given would fail on the cluster, far
from the cause, or fall back to other credentials.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from components.common.redact import find_secrets

REPO = Path(__file__).resolve().parents[1]
# never uploaded with the working_dir (gitignore-style patterns)
EXCLUDES = [".git", ".venv", "venv", "outputs", "mlruns", "mlartifacts", "__pycache__", "*.pyc", ".pytest_cache",
            ".whl", "*.egg-info", "benchmarks/__pycache__"]
AGENT_WAIT_S = 120  # how long a fresh head may take to start the agent that accepts jobs


class JobError(RuntimeError):
    """The job server cannot be reached or refused the request; the message names the address."""


SECRET_ADVICE = ("a job's runtime_env and entrypoint are stored by the cluster and shown in its dashboard, "
                 "so secrets never travel in them; set it in the cluster's environment instead (the "
                 "latentflow-aws secretRef in infra/kuberay, or the environment of `ray start`), which the "
                 "job's driver and workers inherit")


def refuse_secrets(where: list[str]) -> None:
    if where:  # names the keys, never the values
        raise JobError(f"{', '.join(where)}: looks like a secret (by its name or value): {SECRET_ADVICE}")


class NoAddress(JobError):
    """No job server named anywhere: the CLI's usage error."""


# `ray job submit`'s order (ray.dashboard.utils.get_address_for_submission_client): the API server
# variable, then the cluster one. A flag beats both, as flags do.
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def resolve_address(given: str | None) -> str:
    """``--address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    for address in (given, *(os.environ.get(name) for name in ADDRESS_VARIABLES)):
        if address:
            return address
    raise NoAddress("no Ray job server: pass --address, or set RAY_API_SERVER_ADDRESS or RAY_ADDRESS "
                    "(e.g. http://127.0.0.1:8265, the head's dashboard)")


@contextmanager
def address_variables_unset():
    """Ray's client lets those variables override the address it is given (ray-project/ray#41590,
    open), which would send a job meant for --address to whatever the shell last exported."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        with address_variables_unset():
            return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError, by version
        raise JobError(f"cannot reach the Ray job server at {address}: {e} (is the dashboard running? "
                       "`ray start --head` starts it on port 8265)") from None


def entrypoint(config: str, overrides: list[str], workflow_id: str | None) -> str:
    """The command the job runs, relative to the working_dir (the repository root)."""
    path = Path(config).resolve()
    try:
        config = path.relative_to(REPO).as_posix()
    except ValueError:
        raise JobError(f"{config}: the config must live inside the repository ({REPO}), which is the job's "
                       "working_dir") from None
    args = ["python", "-m", "pipelines.cli", "run", config]
    refuse_secrets([f"--set {key}" for key, _, value in (o.partition("=") for o in overrides)
                    if find_secrets({key: value})])
    for override in overrides:
        args += ["--set", override]
    if workflow_id:
        args += ["--workflow-id", workflow_id]
    return shlex.join(args)


def runtime_env(config_env: dict[str, Any]) -> dict[str, Any]:
    refuse_secrets(find_secrets(config_env, "ray.runtime_env."))
    env = {**config_env, "working_dir": str(REPO)}
    env["excludes"] = sorted(set(config_env.get("excludes", [])) | set(EXCLUDES))
    return env


def submit(address: str, config: str, overrides: list[str], workflow_id: str | None,
           config_env: dict[str, Any]) -> str:
    """Submit the pipeline; returns the submission id."""
    from pipelines.runtime import new_workflow_id

    workflow_id = workflow_id or new_workflow_id()
    command = entrypoint(config, overrides, workflow_id)
    jobs = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return jobs.submit_job(entrypoint=command, runtime_env=runtime_env(config_env),
                                   metadata={"latentflow.workflow_id": workflow_id,
                                             "latentflow.config": Path(config).name})
        except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError with the server's message
            # A head that has just started answers before its job agent is up: wait for it.
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise JobError(f"{address}: submission refused: {e}") from None


def follow(address: str, submission_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    jobs = client(address)

    async def tail():
        async for lines in jobs.tail_job_logs(submission_id):
            write(lines)

    asyncio.run(tail())
    return status(address, submission_id)


def status(address: str, submission_id: str) -> str:
    try:
        return str(client(address).get_job_status(submission_id).value)
    except RuntimeError as e:
        raise JobError(f"{address}: no job {submission_id!r}: {e}") from None


def list_jobs(address: str) -> list[dict[str, Any]]:
    rows = []
    for job in client(address).list_jobs():
        rows.append({"submission_id": job.submission_id, "status": str(job.status.value),
                     "entrypoint": job.entrypoint, "start_time": job.start_time, "end_time": job.end_time,
                     "workflow_id": (job.metadata or {}).get("latentflow.workflow_id", "")})
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def logs(address: str, submission_id: str) -> str:
    try:
        return client(address).get_job_logs(submission_id)
    except RuntimeError as e:
        raise JobError(f"{address}: no job {submission_id!r}: {e}") from None


def stop(address: str, submission_id: str) -> bool:
    try:
        return bool(client(address).stop_job(submission_id))
    except RuntimeError as e:
        raise JobError(f"{address}: no job {submission_id!r}: {e}") from None
