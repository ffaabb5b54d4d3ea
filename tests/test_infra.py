"""The deployment files under infra/ stay deployable.

Every YAML document of every ``infra/**/*.yaml`` (and the RayJob manifests that ConfigMaps carry as
``*.yaml`` keys) must parse and be a kind we deploy. Every ``latentflow …`` command found in any
string value (entrypoints, shell scripts, exec lists) must name a subcommand the CLI has and a config
that ``latentflow plan`` accepts (tests/test_infra_commands.py). The Ray clusters the manifests describe must agree with each other,
with infra/Dockerfile and with pyproject, and no file may carry AWS credentials. A new manifest is
picked up by all of this without touching the test. The nightly launchers' own checks are in
tests/test_infra_cron.py; reading the files is tests/infra_files.py.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from infra_files import (COMMANDS, DOCKERFILE, IMAGE, INFRA, JOB_ENDS, K8S_KINDS, LAUNCHER, REPO, REQUIRED_KINDS,
                         all_documents, cleanup_problems, commands_in_string, config_maps, config_path,
                         credential_problems, deletion_rules, dockerfile, documents, first_difference,
                         manifest_files, parse, pod_templates, ray_cluster_specs, ray_floor, ray_job_specs, rel,
                         version)


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
