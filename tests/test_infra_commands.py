"""Every ``latentflow …`` command found in any string value of the deployment files (entrypoints,
shell scripts, exec lists) names a subcommand the CLI has and a config that ``latentflow plan``
accepts. The CLI checks run ``python -m pipelines.cli`` as a subprocess (~0.4 s for --help, ~3.5 s
for plan), once per subcommand and once per config, never per manifest."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile

import pytest

from infra_files import COMMANDS, Command, REPO, commands_in, config_path, dockerfile, ray_job_specs


# ---------------------------------------------------------------- the CLI, as a subprocess


def cli_env() -> dict[str, str]:
    """The environment of a machine without credentials: no AWS_/MLFLOW_ variables (the test
    session's moto fixture may have set some), no ~/.aws files, and no instance metadata service,
    so `plan` cannot reach S3 and shows the DAG only, the same on a laptop, in CI and on EC2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env["HOME"] = empty_home().name
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


@functools.cache
def empty_home() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="latentflow-infra-home-")  # removed at exit


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


@functools.cache
def cli_help(subcommand: str) -> subprocess.CompletedProcess:
    return cli(subcommand, "--help")


@functools.cache
def cli_plan(config: str, overrides: tuple[str, ...]) -> subprocess.CompletedProcess:
    return cli("plan", config, *[arg for o in overrides for arg in ("--set", o)])


def output(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-3000:]


# ================================================================ tests: latentflow commands


def test_every_ray_job_entrypoint_is_found_as_a_command():
    """The command search is what the CLI checks below rely on: it must see every entrypoint."""
    found = {where for wheres in COMMANDS.values() for where in wheres}
    for where, spec in ray_job_specs():
        assert where in found, f"{where}: entrypoint {spec.get('entrypoint')!r} not found as a latentflow command"


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: " ".join(c.argv))
def test_command_config_exists_and_plans(command):
    where = ", ".join(COMMANDS[command])
    for token in command.configs:
        path = config_path(token)
        assert path is not None, f"{where}: {token} is outside the image's WORKDIR {dockerfile()['workdir']}"
        assert path.is_file(), f"{where}: {token} does not exist in the repository"
        top = path.relative_to(REPO).parts[0]
        assert top in dockerfile()["copied"], f"{where}: {token}: infra/Dockerfile does not COPY {top}/"
        result = cli_plan(path.relative_to(REPO).as_posix(), command.overrides)
        assert result.returncode == 0, f"{where}: `latentflow plan {token}` failed:\n{output(result)}"


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: " ".join(c.argv))
def test_command_subcommand_exists(command):
    result = cli_help(command.subcommand)
    assert result.returncode == 0, (f"{', '.join(COMMANDS[command])}: `latentflow {command.subcommand}` is not a "
                                    f"command of pipelines/cli.py:\n{output(result)}")


def test_subcommand_check_rejects_unknown_subcommands():
    """The control for the test above: --help after an unknown subcommand must not exit 0."""
    assert cli_help("no-such-subcommand").returncode != 0


def test_command_search_reads_every_form():
    found = commands_in({
        "entrypoint": "latentflow run configs/a.yaml --set dit.train.max_steps=10",
        "command": ["/bin/sh", "-c", "set -e\ncd /opt/latentflow && latentflow retrain \\\n  configs/b.yaml; echo done"],
        "exec": ["latentflow", "sample", "--workflow-id", "x"],
        "module": "python -m pipelines.cli plan configs/c.yaml",
        "not commands": ["ghcr.io/latentflow/latentflow:latest", "latentflow-config", "latentflow"],
    })
    assert found == [("run", "configs/a.yaml", "--set", "dit.train.max_steps=10"), ("retrain", "configs/b.yaml"),
                     ("sample", "--workflow-id", "x"), ("plan", "configs/c.yaml")]
    assert Command(found[0]).configs == ["configs/a.yaml"]
    assert Command(found[0]).overrides == ("dit.train.max_steps=10",)
