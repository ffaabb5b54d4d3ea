"""The nightly retrain launchers (infra/kubernetes/cronjob-rayjob.yaml): the CronJob's own script,
run with kubectl faked, ends on every final state of its RayJob and prunes old ones; the CronJob
has the ConfigMap and the rights it needs to create that RayJob."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from infra_files import INFRA, all_documents, config_maps, documents


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
