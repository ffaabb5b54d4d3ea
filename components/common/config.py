"""Typed configuration: YAML file -> pydantic objects -> ``--set`` overrides.

Unknown keys and wrong types are rejected before any work starts, with messages that name the
dotted key and the file. There is no global config object: each step receives only its section.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the dotted key."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
    # Fields that never change what a step computes (where it runs, how often it logs): left out
    # of cache keys, so changing them does not re-run anything.
    cache_exempt: ClassVar[frozenset[str]] = frozenset()
    # Fields renamed after cache keys were recorded: {new name: old name}. A cache key hashes such a field
    # under its old name, so renaming a setting neither re-runs nor re-keys what users have cached.
    cache_names: ClassVar[dict[str, str]] = {}
    # Fields added after cache keys were recorded: {name: the value that means "as before"}. At that
    # value the field is left out of the key, so adding a capability re-keys nothing users cached.
    cache_added: ClassVar[dict[str, Any]] = {}

    def cache_relevant(self) -> dict[str, Any]:
        """The config as JSON, without cache-exempt fields at any depth, renamed fields under their old names."""
        return _cache_view(self, self.model_dump(mode="json"))


def _cache_view(model: StrictModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name in model.cache_exempt:
        dumped.pop(name, None)
    for name, as_before in model.cache_added.items():
        if name in dumped and dumped[name] == as_before:
            dumped.pop(name)
    for name, value in dumped.items():
        child = getattr(model, name)
        if isinstance(child, StrictModel) and isinstance(value, dict):
            _cache_view(child, value)
    for new, old in model.cache_names.items():
        if new in dumped:
            dumped[old] = dumped.pop(new)
    return dumped


class StepResources(StrictModel):
    """What a step asks the cluster for. Never part of a step's cache key: moving a step to more
    or bigger machines does not change what it computes."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    max_retries: int = Field(0, ge=0)
    # Parallelism inside the step: Ray Train workers for learned stages, Ray tasks for data stages.
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    # Ray Train's placement of a learned stage's workers: PACK fills a node first, SPREAD puts them on
    # different nodes where it can (STRICT_* insist, and wait for nodes that can hold them).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class StepConfig(StrictModel):
    """Base of every step's section."""

    cache_exempt: ClassVar[frozenset[str]] = frozenset({"resources"})

    resources: StepResources = Field(default_factory=StepResources)


class StorageConfig(StrictModel):
    root: str = "./outputs"

    @field_validator("root")
    @classmethod
    def _no_credentials_in_uri(cls, value: str) -> str:
        if "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("credentials never go in the storage URI; use the AWS environment")
        return value


class TrackingConfig(StrictModel):
    # MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME override the file's values (load_config), --set
    # overrides both. None: an SQLite database under a local storage root.
    uri: str | None = None
    # None: "latentflow-<pipeline name>".
    experiment: str | None = None


# The variables MLflow's own tools read, so a shell or pod that sets them means them for latentflow
# too: a preset names the demo's server, the cluster's ConfigMap the real one.
TRACKING_ENVIRONMENT = {"uri": "MLFLOW_TRACKING_URI", "experiment": "MLFLOW_EXPERIMENT_NAME"}


class RayConfig(StrictModel):
    # None starts a local Ray for the run (or joins the cluster of a Ray job); "auto" joins a running one.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    runtime_env: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------- loading and overrides


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar or list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. dit.optimizer.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``--set`` applied. Typing happens at validation, so a
    value is converted exactly as the field's type says (``1e-4`` for a float, ``true`` for a bool),
    and a wrong one is reported with its key."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, key in enumerate(keys):
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):  # a list entry by index: superres.0.train.max_steps=100
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"--set {text!r}: {where}: the list has entries 0..{len(node) - 1}")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(keys[:depth])} is not a section")
            if depth == len(keys) - 1:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def describe_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"{source}: invalid value for '{key}': {item['msg']}{shown}")
    return "\n".join(lines)


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, source)) from None


def with_tracking_environment(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``tracking.uri`` / ``tracking.experiment`` taken from the environment where set.
    Strings as they are (not parsed as YAML like --set: an experiment named 2026 stays a name)."""
    found = {field: os.environ[name] for field, name in TRACKING_ENVIRONMENT.items() if os.environ.get(name)}
    tracking = data.get("tracking")
    if not found or not isinstance(tracking, (dict, type(None))):  # a malformed section: validation names it
        return data
    return {**data, "tracking": {**(tracking or {}), **found}}


def load_config(model: type[M], path: str | os.PathLike, overrides: list[str] | None = None) -> M:
    """Read, override and validate a config file; every problem is a ConfigError naming the key.
    Order, last wins: the file, the MLflow environment (for a model with a ``tracking`` section), --set."""
    overrides = overrides or []
    data = read_yaml(path)
    if "tracking" in model.model_fields:
        data = with_tracking_environment(data)
    data = apply_overrides(data, overrides)
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return validate(model, data, source)


def known_preset(value: str, presets: dict[str, Any], what: str) -> str:
    """A ``preset`` field's validator: ``value`` must be a key of ``presets`` (a stage's
    ``presets.py``: plain data, so checking a config imports no torch)."""
    if value not in presets:
        raise ValueError(f"unknown {what} preset {value!r}; valid presets: {', '.join(presets)}")
    return value
