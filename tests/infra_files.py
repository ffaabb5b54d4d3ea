"""Reading the deployment files under infra/ for the infra tests: every YAML document (and the
RayJob manifests ConfigMaps carry), infra/Dockerfile and pyproject, the Ray clusters, jobs and
their clean-up rules the manifests describe, the ``latentflow …`` commands in any of their string
values, and a scan for literal AWS credentials."""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


