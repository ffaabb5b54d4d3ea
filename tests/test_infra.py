"""The deployment files under infra/ stay deployable.

Every YAML document of every ``infra/**/*.yaml`` (and the RayJob manifests that ConfigMaps carry as
``*.yaml`` keys) must parse and be a kind we deploy. Every ``latentflow …`` command found in any
string value (entrypoints, shell scripts, exec lists) must name a subcommand the CLI has and a config
that ``latentflow plan`` accepts. The Ray clusters the manifests describe must agree with each other,
with infra/Dockerfile and with pyproject, and no file may carry AWS credentials. A new manifest is
picked up by all of this without touching the test.

The CLI checks run ``python -m pipelines.cli`` as a subprocess (~0.4 s for --help, ~3.5 s for plan),
once per subcommand and once per config, never per manifest.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
IMAGE = "ghcr.io/latentflow/latentflow"

# (apiVersion, kind) of everything we deploy. A Secret is deliberately absent: credentials are
# created out of band (infra/README.md), never committed.
K8S_KINDS = {
    ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCronJob"),
    ("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("batch/v1", "CronJob"),
    ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apps/v1", "Deployment"), ("v1", "Service"),
}
LAUNCHER = "ray-cluster-launcher"  # a `ray up` config: no kind, but cluster_name and provider
# What the known files must hold (embedded documents count for the file that embeds them).
REQUIRED_KINDS = {
    "kuberay/raycluster.yaml": {"RayCluster", "ConfigMap"},
    "kuberay/rayjob.yaml": {"RayJob"},
    "kuberay/raycronjob.yaml": {"RayCronJob"},
    "kubernetes/cronjob-rayjob.yaml": {"CronJob", "ConfigMap", "RayJob", "ServiceAccount", "Role", "RoleBinding"},
    "ray/aws-autoscaler.yaml": {LAUNCHER},
    "kubernetes/mlflow.yaml": {"Deployment", "Service"},
}


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class Doc:
    file: str     # relative to infra/
    where: str    # file#n, or file#n/key#m for a manifest inside a ConfigMap
    data: Any

    @property
    def kind(self) -> str | None:
        if not isinstance(self.data, dict):
            return None
        if "kind" in self.data:
            return self.data["kind"]
        return LAUNCHER if {"cluster_name", "provider"} <= self.data.keys() else None


def manifest_files() -> list[Path]:
    return sorted(p for pattern in ("*.yaml", "*.yml") for p in INFRA.rglob(pattern))


def rel(path: Path) -> str:
    return path.relative_to(INFRA).as_posix()


def parse(text: str, file: str, where: str) -> list[Doc]:
    docs = []
    for i, data in enumerate(yaml.safe_load_all(text), 1):
        if data is None:
            continue
        doc = Doc(file, f"{where}#{i}", data)
        docs.append(doc)
        if doc.kind == "ConfigMap":  # e.g. the RayJob a plain CronJob creates with kubectl
            for key, value in (data.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")) and isinstance(value, str):
                    docs += parse(value, file, f"{doc.where}/{key}")
    return docs


@functools.cache
def documents(path: Path) -> tuple[Doc, ...]:
    return tuple(parse(path.read_text(), rel(path), rel(path)))


def all_documents() -> list[Doc]:
    return [doc for path in manifest_files() for doc in documents(path)]


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) pair under a parsed document, depth first."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")


# ---------------------------------------------------------------- latentflow commands

# `latentflow ARGS` or `python -m pipelines.cli ARGS`, up to the end of the shell command. The
# look-behind keeps image names (…/latentflow:tag) and resource names (latentflow-config) out.
COMMAND = re.compile(r"(?<![\w./:-])(?:latentflow|python3?\s+-m\s+pipelines\.cli)[ \t]+(?P<args>[^\n;&|()`]+)")


def commands_in_string(text: str) -> list[tuple[str, ...]]:
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    found = []
    for match in COMMAND.finditer(text):
        try:
            argv = shlex.split(match["args"], comments=True)
        except ValueError:  # an unbalanced quote cut by the pattern: good enough to name the parts
            argv = match["args"].split()
        if argv and re.fullmatch(r"[a-z][\w-]*", argv[0]):
            found.append(tuple(argv))
    return found


def commands_in(value: Any) -> list[tuple[str, ...]]:
    """latentflow argv tuples (subcommand first) in every string of a parsed document, and in
    exec-form lists such as ["latentflow", "run", "cfg.yaml"]."""
    found = []
    for _, v in walk(value):
        if isinstance(v, str):
            found += commands_in_string(v)
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            if Path(v[0]).name == "latentflow" and len(v) > 1:
                found.append(tuple(v[1:]))
            elif [Path(v[0]).name.rstrip("3"), *v[1:3]] == ["python", "-m", "pipelines.cli"] and len(v) > 3:
                found.append(tuple(v[3:]))
    return found


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]

    @property
    def subcommand(self) -> str:
        return self.argv[0]

    @property
    def configs(self) -> list[str]:
        return [tok for tok in self._positionals() if tok.endswith((".yaml", ".yml"))]

    @property
    def overrides(self) -> tuple[str, ...]:
        out, args = [], list(self.argv[1:])
        for i, tok in enumerate(args):
            if tok == "--set" and i + 1 < len(args):
                out.append(args[i + 1])
            elif tok.startswith("--set="):
                out.append(tok.removeprefix("--set="))
        return tuple(out)

    def _positionals(self) -> list[str]:
        args, out, skip = list(self.argv[1:]), [], False
        for tok in args:
            if skip:
                skip = False
            elif tok == "--set":
                skip = True
            elif not tok.startswith("-"):
                out.append(tok)
        return out


def discover_commands() -> dict[Command, list[str]]:
    """Every distinct latentflow command in infra/, with where it was found. Never raises: a file
    that does not parse is reported by test_manifest_documents_are_known_kinds instead."""
    found: dict[Command, list[str]] = {}
    for path in manifest_files():
        try:
            docs = documents(path)
        except yaml.YAMLError:
            continue
        for doc in docs:
            data = doc.data
            if doc.kind == "ConfigMap":  # embedded manifests are searched as documents of their own
                data = {**data, "data": {k: v for k, v in (data.get("data") or {}).items()
                                         if not k.endswith((".yaml", ".yml"))}}
            for argv in commands_in(data):
                found.setdefault(Command(argv), []).append(doc.where)
    return found


COMMANDS = discover_commands()


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


# ---------------------------------------------------------------- the Dockerfile and pyproject


@functools.cache
def dockerfile() -> dict[str, Any]:
    workdir, copied, entrypoint, args = None, set(), None, {}
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "ARG":
            name, _, default = words[1].partition("=")
            args[name] = default
        elif words[0] == "WORKDIR":
            workdir = words[1]
        elif words[0] == "COPY":
            sources = [w for w in words[1:-1] if not w.startswith("--")]
            copied |= {s.rstrip("/") for s in sources}
        elif words[0] == "ENTRYPOINT":
            entrypoint = line
    return {"workdir": workdir, "copied": copied, "entrypoint": entrypoint, "args": args}


def ray_floor() -> tuple[int, ...]:
    match = re.search(r'"ray\[[^\]]*\]>=([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml: no ray[...]>=X requirement"
    return version(match[1])


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def config_path(token: str) -> Path | None:
    """A config named in a command, as a path in this checkout. Relative paths are relative to the
    job's working_dir (the repository root, the image's WORKDIR); absolute ones must be inside it."""
    workdir = dockerfile()["workdir"]
    if token.startswith("/"):
        if not workdir or not token.startswith(workdir.rstrip("/") + "/"):
            return None
        token = token[len(workdir.rstrip("/")) + 1:]
    return REPO / token


# ---------------------------------------------------------------- the Ray clusters in the manifests


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for doc in all_documents():
        d = doc.data
        if doc.kind == "RayCluster":
            specs.append((doc.where, d.get("spec") or {}))
        elif doc.kind == "RayJob" and "rayClusterSpec" in (d.get("spec") or {}):
            specs.append((doc.where, d["spec"]["rayClusterSpec"]))
        elif doc.kind == "RayCronJob":
            template = (d.get("spec") or {}).get("jobTemplate") or {}
            if "rayClusterSpec" in template:
                specs.append((doc.where, template["rayClusterSpec"]))
    return specs


def ray_job_specs() -> list[tuple[str, dict]]:
    """RayJob specs: a RayJob's spec, and a RayCronJob's jobTemplate (a RayJob spec, inline)."""
    specs = []
    for doc in all_documents():
        if doc.kind == "RayJob":
            specs.append((doc.where, doc.data.get("spec") or {}))
        elif doc.kind == "RayCronJob":
            specs.append((doc.where, (doc.data.get("spec") or {}).get("jobTemplate") or {}))
    return specs


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [(f"worker group {g.get('groupName')}", g) for g in spec.get("workerGroupSpecs") or []]
    return [(name, (group.get("template") or {}).get("spec") or {}) for name, group in groups]


# KubeRay 1.6's RayJob deletionRules (ray-operator/apis/ray/v1/rayjob_types.go and
# controllers/ray/utils/validation.go at v1.6.0): the enums, and the order the TTLs must keep.
DELETION_ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")
DELETION_POLICIES = {*DELETION_ORDER, "DeleteNone"}
DELETION_CONDITIONS = {"jobStatus": {"SUCCEEDED", "FAILED"}, "jobDeploymentStatus": {"Failed"}}
JOB_ENDS = [("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")]


def deletion_rules(spec: dict) -> dict[tuple[str, str], dict[str, int]]:
    """(condition field, value) -> {policy: ttlSeconds} of a RayJob spec's deletionRules."""
    rules: dict[tuple[str, str], dict[str, int]] = {}
    for rule in (spec.get("deletionStrategy") or {}).get("deletionRules") or []:
        condition = dict(rule.get("condition") or {})
        ttl = condition.pop("ttlSeconds", 0)
        (field, value), = condition.items()  # the CRD: exactly one of jobStatus, jobDeploymentStatus
        rules.setdefault((field, value), {})[rule["policy"]] = ttl
    return rules


def cleanup_problems(where: str, spec: dict) -> list[str]:
    """A RayJob deletes its cluster when it ends: shutdownAfterJobFinishes with a TTL, or deletionRules
    (KubeRay >= 1.5) for every end, never both (the operator refuses the mix), each rule as the CRD
    and the operator's validation accept it."""
    if not (spec.get("deletionStrategy") or {}).get("deletionRules"):
        shuts_down = spec.get("shutdownAfterJobFinishes") is True and isinstance(spec.get("ttlSecondsAfterFinished"), int)
        return [] if shuts_down else [f"{where}: needs shutdownAfterJobFinishes: true and ttlSecondsAfterFinished, "
                                      "or deletionStrategy.deletionRules"]
    problems = [f"{where}: {key} beside deletionRules (KubeRay refuses both)"
                for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished") if key in spec]
    try:
        rules = deletion_rules(spec)
    except (ValueError, KeyError):
        return problems + [f"{where}: a deletion rule without a policy or with not exactly one condition"]
    for (field, value), policies in rules.items():
        if value not in DELETION_CONDITIONS.get(field, ()) or not set(policies) <= DELETION_POLICIES:
            problems.append(f"{where}: rule {field}={value} {sorted(policies)}: not a KubeRay 1.6 value")
        ttls = [policies[p] for p in DELETION_ORDER if p in policies]
        if ttls != sorted(ttls) or any(not isinstance(t, int) or t < 0 for t in ttls):
            problems.append(f"{where}: {field}={value}: TTLs must be integers >= 0, workers <= cluster <= self")
    for end in JOB_ENDS:
        if not {"DeleteCluster", "DeleteSelf"} & set(rules.get(end, {})):
            problems.append(f"{where}: no deletion rule removes the cluster when {end[0]} is {end[1]}")
    return problems


def config_maps() -> dict[tuple[str, str], list[tuple[str, dict]]]:
    """(file, ConfigMap name) -> [(where, data)]."""
    out: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for doc in all_documents():
        if doc.kind == "ConfigMap":
            out.setdefault((doc.file, doc.data["metadata"]["name"]), []).append((doc.where, doc.data.get("data") or {}))
    return out


def first_difference(a: Any, b: Any, path: str = "spec") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b:
                return f"{path}.{key} only in {'the first' if key in a else 'the second'}"
            if (diff := first_difference(a[key], b[key], f"{path}.{key}")) is not None:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if (diff := first_difference(x, y, f"{path}[{i}]")) is not None:
                return diff
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


# ---------------------------------------------------------------- credentials

ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
SECRET_IN_TEXT = re.compile(r"(?i)aws_secret_access_key[\"']?\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{30,}")
CREDENTIAL_NAMES = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}


def credential_problems(text: str, docs: list[Doc] | tuple[Doc, ...]) -> list[str]:
    problems = [f"an AWS access key id ({m[0][:4]}…) in the text" for m in ACCESS_KEY_ID.finditer(text)]
    problems += ["a literal aws_secret_access_key in the text" for _ in SECRET_IN_TEXT.finditer(text)]
    for doc in docs:
        if doc.kind == "Secret":
            problems.append(f"{doc.where}: a Secret in git; create it out of band (infra/README.md)")
        for path, value in walk(doc.data):
            if not isinstance(value, dict):
                continue
            for key, v in value.items():
                if str(key).lower() in CREDENTIAL_NAMES and isinstance(v, (str, int)) and str(v).strip():
                    problems.append(f"{doc.where}{path}.{key}: a literal credential")
            if str(value.get("name", "")).lower() in CREDENTIAL_NAMES and "value" in value:
                problems.append(f"{doc.where}{path}: env {value['name']} has a literal value, not valueFrom")
    return problems


# ================================================================ tests: documents


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_manifest_documents_are_known_kinds(path):
    docs = documents(path)  # a YAML error fails here, naming the file and line
    assert docs, f"{rel(path)}: no YAML documents"
    for doc in docs:
        if doc.kind == LAUNCHER:
            continue
        assert isinstance(doc.data, dict) and "kind" in doc.data, \
            f"{doc.where}: neither a Kubernetes object (apiVersion/kind) nor a Ray cluster launcher config"
        pair = (doc.data.get("apiVersion"), doc.data["kind"])
        assert pair in K8S_KINDS, f"{doc.where}: unexpected {pair}; expected one of {sorted(K8S_KINDS)}"
        meta = doc.data.get("metadata") or {}
        assert meta.get("name") or meta.get("generateName"), f"{doc.where}: no metadata.name"


def test_known_files_hold_their_resources():
    for file, kinds in REQUIRED_KINDS.items():
        path = INFRA / file
        assert path.is_file(), f"infra/{file} is missing"
        found = {doc.kind for doc in documents(path)}
        assert kinds <= found, f"infra/{file}: expected {sorted(kinds)}, found {sorted(k for k in found if k)}"


def test_ray_cluster_launcher_configs_validate():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launchers = [doc for doc in all_documents() if doc.kind == LAUNCHER]
    assert launchers, "no Ray cluster launcher config under infra/"
    for doc in launchers:
        config = prepare_config(copy.deepcopy(doc.data))  # what `ray up` does before validating
        validate_config(config)  # ray's own JSON schema
        docker = config.get("docker") or {}
        assert str(docker.get("image", "")).startswith(IMAGE + ":"), f"{doc.where}: docker.image is not {IMAGE}"
        if dockerfile()["entrypoint"]:
            # the launcher runs `docker run … IMAGE bash`, which the image's ENTRYPOINT would swallow
            assert any(str(o).startswith("--entrypoint") for o in docker.get("run_options", [])), \
                f"{doc.where}: infra/Dockerfile has an ENTRYPOINT; docker.run_options must reset it (--entrypoint=)"
        gpu_types = [name for name, t in config["available_node_types"].items()
                     if re.match(r"(p\d|g\d)", str(t["node_config"].get("InstanceType", "")))]
        assert gpu_types, f"{doc.where}: no GPU node type"


# ================================================================ tests: the Ray clusters


def test_ray_clusters_run_the_image_with_mlflow_and_aws_from_the_environment():
    specs = ray_cluster_specs()
    assert specs, "no Ray cluster spec under infra/"
    maps = config_maps()
    problems = []
    for where, spec in specs:
        file = where.split("#")[0]
        if version(str(spec.get("rayVersion", "0"))) < ray_floor():
            problems.append(f"{where}: rayVersion {spec.get('rayVersion')} is below pyproject's ray floor")
        gpu_groups = 0
        for group, pod in pod_templates(spec):
            containers = pod.get("containers") or []
            if not containers:
                problems.append(f"{where} {group}: no containers")
                continue
            for c in containers:
                if not str(c.get("image", "")).startswith(IMAGE + ":"):
                    problems.append(f"{where} {group}: image {c.get('image')!r} is not {IMAGE}")
            ray = containers[0]  # KubeRay runs Ray in the first container
            limits = (ray.get("resources") or {}).get("limits") or {}
            gpu_groups += int(limits.get("nvidia.com/gpu", 0)) > 0
            env_from = ray.get("envFrom") or []
            env = ray.get("env") or []
            mlflow_maps = [ref["configMapRef"]["name"] for ref in env_from if "configMapRef" in ref]
            mlflow_ok = any("MLFLOW_TRACKING_URI" in data for name in mlflow_maps
                            for _, data in maps.get((file, name), []))
            mlflow_ok |= any(e.get("name") == "MLFLOW_TRACKING_URI" and "configMapKeyRef" in (e.get("valueFrom") or {})
                             for e in env)
            if not mlflow_ok:
                problems.append(f"{where} {group}: MLFLOW_TRACKING_URI does not come from a ConfigMap in {file}")
            secret_keys = {e.get("name") for e in env if "secretKeyRef" in (e.get("valueFrom") or {})}
            if not any("secretRef" in ref for ref in env_from) and not \
                    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret_keys:
                problems.append(f"{where} {group}: AWS credentials do not come from a Secret")
            for name in mlflow_maps:
                if (file, name) not in maps:  # each file applies on its own
                    problems.append(f"{where} {group}: ConfigMap {name} is not defined in {file}")
        for group in [spec.get("headGroupSpec") or {}, *(spec.get("workerGroupSpecs") or [])]:
            for key, value in (group.get("rayStartParams") or {}).items():
                if not isinstance(value, str):  # KubeRay's type is map[string]string
                    problems.append(f"{where}: rayStartParams.{key} must be a string, not {value!r}")
        if gpu_groups == 0:
            problems.append(f"{where}: no worker group with nvidia.com/gpu (training needs one)")
        if gpu_groups == len(spec.get("workerGroupSpecs") or []):
            problems.append(f"{where}: no CPU-only worker group (sharding and latents run there)")
    assert not problems, "\n".join(problems)


def test_ray_cluster_copies_agree():
    """A YAML file cannot include another, so the cluster shape is written out in each manifest;
    this keeps the copies equal to raycluster.yaml's."""
    specs = ray_cluster_specs()
    reference = next(((w, s) for w, s in specs if w.startswith("kuberay/raycluster.yaml")), None)
    assert reference, "kuberay/raycluster.yaml has no RayCluster"
    differences = [f"{where} vs {reference[0]}: {diff}" for where, spec in specs
                   if (diff := first_difference(reference[1], spec)) is not None]
    assert not differences, "\n".join(differences)


def test_config_maps_agree_and_name_the_configs_tracking_server():
    copies: dict[str, list[tuple[str, dict]]] = {}
    for (_, name), found in config_maps().items():
        copies.setdefault(name, []).extend(found)
    problems = [f"ConfigMap {name}: {where} differs from {found[0][0]}"
                for name, found in copies.items() for where, data in found[1:] if data != found[0][1]]
    uris = {data["MLFLOW_TRACKING_URI"] for found in copies.values() for _, data in found
            if "MLFLOW_TRACKING_URI" in data}
    for token in sorted({token for command in COMMANDS for token in command.configs}):
        path = config_path(token)
        if path is None or not path.is_file():
            continue  # reported by test_command_config_exists_and_plans
        tracking = (yaml.safe_load(path.read_text()).get("tracking") or {}).get("uri")
        # MLFLOW_TRACKING_URI wins over the config's tracking.uri: a different value would mislead
        if tracking and uris and uris != {tracking}:
            problems.append(f"{token}: tracking.uri {tracking} but the ConfigMaps say {sorted(uris)}")
    assert not problems, "\n".join(problems)


def test_ray_jobs_run_latentflow_from_the_images_workdir():
    specs = ray_job_specs()
    assert specs, "no RayJob or RayCronJob under infra/"
    workdir = dockerfile()["workdir"]
    problems = []
    for where, spec in specs:
        if "spec" in spec and "entrypoint" not in spec:
            problems.append(f"{where}: jobTemplate wraps a `spec:`; RayCronJob takes the RayJob spec inline")
            continue
        if len(commands_in_string(str(spec.get("entrypoint", "")))) != 1:
            problems.append(f"{where}: entrypoint {spec.get('entrypoint')!r} is not one latentflow command")
        if spec.get("submissionMode") != "K8sJobMode":
            problems.append(f"{where}: submissionMode is not K8sJobMode")
        problems += cleanup_problems(where, spec)
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        if runtime_env.get("working_dir") != workdir:
            # config paths are relative to the working_dir: it must be the repository as the image holds it
            problems.append(f"{where}: runtimeEnvYAML working_dir {runtime_env.get('working_dir')!r} "
                            f"is not the image's WORKDIR {workdir!r}")
    for doc in all_documents():
        if doc.kind == "RayCronJob" and len(str(doc.data["spec"].get("schedule", "")).split()) != 5:
            problems.append(f"{doc.where}: schedule is not a 5-field cron expression")
    assert not problems, "\n".join(problems)


def test_the_image_installs_the_ray_the_manifests_name():
    """KubeRay reads rayVersion from the manifest and runs the image's ray: the two must be one."""
    import tomllib

    from packaging.requirements import Requirement

    pinned = dockerfile()["args"].get("RAY_VERSION")
    assert pinned, "infra/Dockerfile: no ARG RAY_VERSION=<version>"
    assert re.search(r"ray==\$\{?RAY_VERSION\}?", DOCKERFILE.read_text()), "infra/Dockerfile: ray==${RAY_VERSION} unused"
    versions = {where: str(spec.get("rayVersion")) for where, spec in ray_cluster_specs()}
    differ = {where: v for where, v in versions.items() if v != pinned}
    assert versions and not differ, f"rayVersion differs from the Dockerfile's RAY_VERSION {pinned}: {differ}"
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(Requirement(d) for d in dependencies if Requirement(d).name == "ray")
    assert ray.specifier.contains(pinned), f"pyproject's {ray} does not admit the image's ray {pinned}"


def test_nightly_ray_cron_jobs_delete_their_ray_jobs():
    """RayCronJob 1.6 keeps no history limit: each night's RayJob must delete itself, however it ended."""
    crons = [(doc.where, doc.data["spec"]["jobTemplate"]) for doc in all_documents() if doc.kind == "RayCronJob"]
    assert crons, "no RayCronJob under infra/"
    for where, template in crons:
        rules = deletion_rules(template)
        assert not cleanup_problems(where, template)
        for end in JOB_ENDS:
            assert "DeleteSelf" in rules.get(end, {}), f"{where}: the RayJob is kept forever when {end[0]} is {end[1]}"


def test_cleanup_check_rejects_what_kuberay_refuses():
    """The control for the cleanup checks above."""
    rules = [{"policy": p, "condition": {f: v, "ttlSeconds": t}} for f, v in JOB_ENDS
             for p, t in (("DeleteCluster", 60), ("DeleteSelf", 600))]
    good = {"deletionStrategy": {"deletionRules": rules}}
    assert cleanup_problems("ok", good) == []
    assert cleanup_problems("legacy", {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 0}) == []
    bad = {
        "both": {**good, "shutdownAfterJobFinishes": True},
        "nothing": {},
        "self before cluster": {"deletionStrategy": {"deletionRules": [
            {**r, "condition": {**r["condition"], "ttlSeconds": 900 - r["condition"]["ttlSeconds"]}} for r in rules]}},
        "unknown status": {"deletionStrategy": {"deletionRules": [*rules, {"policy": "DeleteSelf",
                                                                           "condition": {"jobStatus": "STOPPED"}}]}},
        "a missed end": {"deletionStrategy": {"deletionRules": rules[:4]}},
        "two conditions": {"deletionStrategy": {"deletionRules": [{"policy": "DeleteSelf", "condition": {
            "jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}]}},
    }
    for case, spec in bad.items():
        assert cleanup_problems(case, spec), case


FAKE_KUBECTL = """#!/bin/sh
# kubectl for the launcher's script: each status read takes the next line of $FAKE/states (ERR: a failed call)
case "$*" in
  create*) echo rayjob.ray.io/latentflow-retrain-x7k2q ;;
  "get rayjobs -l app.kubernetes.io/component=nightly-retrain"*) cat "$FAKE/listed" ;;
  delete*) echo "$2" >> "$FAKE/deleted" ;;
  *jobDeploymentStatus*)
    line=$(head -n 1 "$FAKE/states"); sed -i 1d "$FAKE/states"
    [ "$line" = ERR ] && exit 1
    printf %s "$line" ;;
  *jobStatus*) cat "$FAKE/job_status" ;;
  *message*) printf %s "spec.rayClusterSpec: invalid" ;;
  *) exit 2 ;;
esac
"""


def launcher_script() -> str:
    (cron,) = [doc for doc in all_documents() if doc.kind == "CronJob"]
    command = cron.data["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["/bin/sh", "-c"], command
    return command[2]


@pytest.mark.parametrize("states, job_status, ok", [
    (["", "ERR", "Initializing", "Running", "Complete"], "SUCCEEDED", True),
    (["Initializing", "ValidationFailed"], "", False),  # the operator rejected the spec: it never moves on
    (["Running", "Failed"], "FAILED", False),
], ids=["succeeded", "validation-failed", "failed"])
def test_cron_launcher_ends_on_every_final_state(tmp_path, states, job_status, ok):
    """The launcher's own script, run by /bin/sh with kubectl and sleep faked on PATH: it polls until
    a final jobDeploymentStatus and exits with the job's outcome, where it once waited forever on
    ValidationFailed (the timeout below is that failure)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("kubectl", FAKE_KUBECTL), ("sleep", '#!/bin/sh\necho "$1" >> "$FAKE/slept"\n')):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "states").write_text("".join(f"{s}\n" for s in states))
    (tmp_path / "job_status").write_text(job_status)
    # ten nights listed oldest first, tonight's last: the three oldest go, tonight's and six more stay
    nights = [f"rayjob.ray.io/latentflow-retrain-n{i}" for i in range(9)] + ["rayjob.ray.io/latentflow-retrain-x7k2q"]
    (tmp_path / "listed").write_text("".join(f"{n}\n" for n in nights))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE": str(tmp_path)}
    done = subprocess.run(["/bin/sh", "-c", launcher_script()], env=env, capture_output=True, text=True, timeout=20)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    assert f"deployment {states[-1]}" in done.stdout and "created rayjob.ray.io/latentflow-retrain-x7k2q" in done.stdout
    assert (tmp_path / "states").read_text() == ""  # it read every state, and none after the final one
    slept = (tmp_path / "slept").read_text().split() if (tmp_path / "slept").exists() else []
    assert len(slept) == len(states) - 1
    if not ok:
        assert "spec.rayClusterSpec: invalid" in done.stderr  # the operator's reason, for the CronJob's log
    assert (tmp_path / "deleted").read_text().split() == nights[:3]  # pruned whatever the outcome


def test_the_mlflow_server_is_the_service_the_config_maps_name():
    from urllib.parse import urlsplit

    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    file = "kubernetes/mlflow.yaml"
    docs = documents(INFRA / file)
    (uri,) = {data["MLFLOW_TRACKING_URI"] for found in config_maps().values() for _, data in found
              if "MLFLOW_TRACKING_URI" in data}
    url = urlsplit(uri)
    name, namespace, *domain = url.hostname.split(".")
    assert domain == ["svc", "cluster", "local"], f"{uri}: not a Service's cluster DNS name"
    services = [d.data for d in docs if d.kind == "Service" and d.data["metadata"]["name"] == name]
    assert len(services) == 1 and services[0]["metadata"]["namespace"] == namespace, f"{file}: no Service {name}.{namespace}"
    (port,) = [p for p in services[0]["spec"]["ports"] if p["port"] == url.port]
    selector = services[0]["spec"]["selector"]
    (deployment,) = [d.data for d in docs if d.kind == "Deployment"
                     and selector.items() <= d.data["spec"]["template"]["metadata"]["labels"].items()]
    assert deployment["metadata"]["namespace"] == namespace
    assert selector.items() <= deployment["spec"]["selector"]["matchLabels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (target,) = [p for p in container["ports"] if port["targetPort"] in (p.get("name"), p["containerPort"])]

    assert container["command"] == ["mlflow", "server"]
    flags = dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])
    known = {opt.removeprefix("--") for param in server.params for opt in param.opts}
    assert set(flags) <= known, f"{file}: not options of `mlflow server`: {sorted(set(flags) - known)}"
    assert flags["host"] == "0.0.0.0" and int(flags["port"]) == target["containerPort"]
    assert "serve-artifacts" in flags and "backend-store-uri" not in flags  # the URI holds the password
    assert is_allowed_host_header(flags["allowed-hosts"].split(","), url.netloc), f"{file}: {url.netloc} refused"
    # the stores come from a Secret, in variables `mlflow server` itself reads
    from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in (e.get("valueFrom") or {})}
    reads = {param.envvar for param in server.params if param.name in ("backend_store_uri", "artifacts_destination")}
    assert reads <= from_secret, f"{file}: {sorted(reads - from_secret)} not from a Secret"
    assert not re.search(r"://[^/\s@]+@", (INFRA / file).read_text()), f"{file}: credentials in a URI"


def test_cron_launchers_create_their_rayjob_with_the_rights_they_need():
    """The plain-CronJob variant: kubectl in the pod creates a RayJob from a mounted ConfigMap."""
    problems = []
    cron_jobs = [doc for doc in all_documents() if doc.kind == "CronJob"]
    for cron in cron_jobs:
        docs = documents(INFRA / cron.file)
        job = cron.data["spec"]["jobTemplate"]["spec"]
        pod = job["template"]["spec"]
        if job.get("backoffLimit") != 0:
            problems.append(f"{cron.where}: backoffLimit must be 0 (a retried launcher creates a second RayJob)")
        # files the pod can read: mountPath/key for every ConfigMap volume defined in the same file
        volumes = {v["name"]: v["configMap"]["name"] for v in pod.get("volumes") or [] if "configMap" in v}
        readable = set()
        for c in pod["containers"]:
            for mount in c.get("volumeMounts") or []:
                for _, data in config_maps().get((cron.file, volumes.get(mount["name"], "")), []):
                    readable |= {f"{mount['mountPath'].rstrip('/')}/{key}" for key in data}
        for c in pod["containers"]:
            script = " ".join(c.get("command") or []) + " " + " ".join(c.get("args") or [])
            for path in re.findall(r"kubectl\s+create\s+(?:\S+\s+)*?-f\s+(\S+)", script):
                if path not in readable:
                    problems.append(f"{cron.where}: kubectl create -f {path}: no ConfigMap in {cron.file} mounted there")
        account = pod.get("serviceAccountName")
        if not any(d.kind == "ServiceAccount" and d.data["metadata"]["name"] == account for d in docs):
            problems.append(f"{cron.where}: ServiceAccount {account!r} is not defined in {cron.file}")
        roles = {d.data["metadata"]["name"]: d.data for d in docs if d.kind == "Role"}
        granted = set()
        for d in docs:
            if d.kind == "RoleBinding" and any(s.get("name") == account for s in d.data.get("subjects") or []):
                for rule in roles.get(d.data["roleRef"]["name"], {}).get("rules", []):
                    if "ray.io" in rule.get("apiGroups", []) and "rayjobs" in rule.get("resources", []):
                        granted |= set(rule.get("verbs", []))
        if not {"create", "get", "list", "delete"} <= granted:
            problems.append(f"{cron.where}: {account!r} may not create, get, list and delete rayjobs.ray.io "
                            f"({sorted(granted)})")
    assert not problems, "\n".join(problems)


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


# ================================================================ tests: credentials


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_no_literal_aws_credentials(path):
    problems = credential_problems(path.read_text(), documents(path))
    assert not problems, f"{rel(path)}:\n" + "\n".join(problems)


def test_credential_check_catches_literals():
    key_id = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example, split so scanners skip this file
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    cases = {
        "env value": f"env:\n- name: AWS_SECRET_ACCESS_KEY\n  value: {secret}\n",
        "ConfigMap data": f"kind: ConfigMap\ndata:\n  AWS_ACCESS_KEY_ID: {key_id}\n",
        "launcher provider": f"provider:\n  aws_credentials:\n    aws_secret_access_key: {secret}\n",
        "shell export": f"command: ['sh', '-c', 'export AWS_SECRET_ACCESS_KEY={secret}']\n",
        "Secret": "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\nstringData: {token: abc}\n",
    }
    for case, text in cases.items():
        assert credential_problems(text, parse(text, "case", "case")), case
    clean = ("env:\n- name: AWS_SECRET_ACCESS_KEY\n  valueFrom:\n    secretKeyRef: {name: aws, key: AWS_SECRET_ACCESS_KEY}\n"
             "envFrom:\n- secretRef: {name: latentflow-aws, optional: true}\n")
    assert credential_problems(clean, parse(clean, "clean", "clean")) == []
