"""What every ``latentflow`` command shares: its consoles (errors redacted before rich wraps
them), the help texts of common options, and loading a config or exiting with status 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from components.common.config import ConfigError
from components.common.redact import redact_text
from pipelines.console import STATE_STYLE as STATUS_STYLE


class RedactingConsole(Console):
    """Errors quote what failed (a tracking URI with its password, a config value): every string
    printed here is redacted before rich wraps it, since a URL folded across two lines would slip
    past the redacting stdout/stderr underneath."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*(redact_text(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Piped output (CI logs, `| tee`) gets a wide table instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = RedactingConsole(stderr=True, highlight=False)

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


def status_markup(status: str | None) -> str:
    style = STATUS_STYLE.get(status or "", {"succeeded": "green"}.get(status or "", "white"))
    return f"[{style}]{status}[/]"
