"""Secrets never leave the process: the redaction rules one by one, then three secrets planted in a
real run (a config key, a tracking URI's password, an environment variable's value) searched for in
everything the run leaves behind: the storage root, the mlflow server's database and artifacts, and
the CLI's output."""

from __future__ import annotations

import logging
import random
import secrets
import string
import uuid

import boto3
import pytest

from conftest import ARTIFACT_BUCKET, REPO, free_port, latentflow
from components.common import redact as redact_module
from components.common.redact import (MASK, RedactingFilter, find_secrets, install_log_redaction, redact,
                                      redact_command, redact_config, redact_text)
from pipelines.jobs import JobError, entrypoint, runtime_env

SMOKE = REPO / "configs" / "pipeline" / "smoke.yaml"


def random_token(n: int = 40) -> str:
    """A random-looking base64url token, the same every run (a seeded draw: no flaky entropy)."""
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(random.Random(n).choices(alphabet, k=n))


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize("key", ["password", "DB_PASSWD", "client_secret", "api_key", "ApiKey", "access_key",
                                 "private_key", "credentials", "auth", "Authorization", "session_token",
                                 "MY_SERVICE_TOKEN", "myServiceToken", "github-token", "AWS_SECRET_ACCESS_KEY"])
def test_secret_named_keys_are_masked_at_any_depth(key):
    config = {"ray": {"runtime_env": {"env_vars": {key: "plain-value"}}}, "steps": [{key: {"nested": 1}}]}
    assert redact(config) == {"ray": {"runtime_env": {"env_vars": {key: MASK}}}, "steps": [{key: MASK}]}


@pytest.mark.parametrize("key", ["max_tokens", "tokenizer", "author", "cache_key", "image_key", "kid_keys",
                                 "passes", "sort_keys"])
def test_ordinary_keys_are_kept(key):
    assert redact({key: "value"}) == {key: "value"}


def test_url_userinfo_is_masked_alone_and_inside_text():
    assert redact_text("https://user:p4ss@host:5000/api") == "https://***@host:5000/api"
    assert redact_text("http://tok3n@host") == "http://***@host"  # a bare user part can be a token too
    text = "API request to http://lf:hunter2@127.0.0.1:5000/api/2.0/runs failed"
    assert redact_text(text) == "API request to http://***@127.0.0.1:5000/api/2.0/runs failed"
    for kept in ("s3://bucket/key@v2", "mail me at someone@example.com", "http://127.0.0.1:5000/x?a=b@c"):
        assert redact_text(kept) == kept


@pytest.mark.parametrize("token", ["AKIA" + "ABCDEFGHIJ234567", "ghp_" + "aB3" * 12, "github_pat_" + "11AB_cd" * 5,
                                   "sk-" + "proj-" + "aB3dE" * 5, "hf_" + "aBcD3" * 7,
                                   "eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.SflKxwRJSMeKKF2QT4"])
def test_known_token_shapes_are_masked(token):
    assert redact_text(f"x {token} y") == f"x {MASK} y"
    assert redact({"note": token}) == {"note": MASK}


def test_a_command_line_loses_the_values_of_secret_named_settings():
    args = ["latentflow", "run", "--set", "ray.runtime_env.env_vars.MY_API_TOKEN=tok-1234", "--set=db.password=pw",
            "--set", "shard.samples_per_shard=20", "--set", "tracking.uri=http://u:p@host:5000"]
    assert redact_command(args) == ("latentflow run --set ray.runtime_env.env_vars.MY_API_TOKEN=*** "
                                    "--set=db.password=*** --set shard.samples_per_shard=20 "
                                    "--set tracking.uri=http://***@host:5000")


def test_bearer_and_generic_high_entropy_values_are_masked():
    token = random_token()
    assert redact_text(f"Authorization: Bearer {token}") == f"Authorization: Bearer {MASK}"
    assert redact({"value": token, "in_text": f"key={token};"}) == {"value": MASK, "in_text": f"key={MASK};"}


def test_what_latentflow_writes_itself_is_kept():
    """Digests, cache keys, run ids, commits, uuids, workflow ids, mixed-case paths, identifiers."""
    manifest = {
        "cache_key": secrets.token_hex(32), "upstream": {"shard": secrets.token_hex(32)},
        "files": [{"path": "train/shard-000000.tar", "sha256": secrets.token_hex(32), "size": 1}],
        "mlflow_run_id": uuid.uuid4().hex, "git_commit": secrets.token_hex(20), "workflow_id": "20261126-131500-3fa2c1",
        "location": "/Users/Alice/Projects2024/LatentFlow/outputs/steps/shard/" + secrets.token_hex(32),
        "config": {"preset": "DiT_Micro_2_with_ClassConditioning_v2_Final", "id": str(uuid.uuid4()),
                   "upper_hex": secrets.token_hex(32).upper(), "lr": 1e-4, "labels": [0, 1]},
    }
    assert redact_config(manifest) == manifest
    # the second guard: under a digest-like key even a mixed-case value skips the generic rule
    odd_digest = random_token(44)
    assert redact({"sha256": odd_digest, "upstream_run_ids": odd_digest}) == {"sha256": odd_digest,
                                                                               "upstream_run_ids": odd_digest}
    assert redact({"sha256": "https://u:p@h"}) == {"sha256": "https://***@h"}  # the other rules still apply


def test_values_of_secret_environment_variables_are_masked_as_substrings(monkeypatch):
    value = f"s{secrets.token_hex(10)}"
    monkeypatch.setenv("LATENTFLOW_TEST_SECRET_TOKEN", value)
    monkeypatch.setenv("LATENTFLOW_TEST_PASSWORD", "short7!")  # under 8 characters: left alone
    monkeypatch.setenv("LATENTFLOW_TEST_TOKEN_PATH", "/tmp/token-file-path")  # says where, is no secret
    monkeypatch.setenv("LATENTFLOW_TEST_PLAIN", "/tmp/plain-value-here")
    assert redact_text(f"echo {value}!") == f"echo {MASK}!"
    assert redact({"forwarded": value, "list": [f"a{value}b"]}) == {"forwarded": MASK, "list": [f"a{MASK}b"]}
    for kept in ("short7!", "/tmp/token-file-path", "/tmp/plain-value-here"):
        assert redact_text(kept) == kept


def test_find_secrets_names_keys_never_values():
    value = random_token()
    config = {"env_vars": {"PLAIN": "1", "MY_TOKEN": "x", "COPIED": value}, "pip": ["https://u:p@index/simple"]}
    assert find_secrets(config, "ray.runtime_env.") == ["ray.runtime_env.env_vars.MY_TOKEN",
                                                        "ray.runtime_env.env_vars.COPIED", "ray.runtime_env.pip.0"]


def test_logging_filter_redacts_message_args_and_traceback():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("latentflow.test_secrets")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting to %s", "http://u:hunter2@host:1")
        try:
            raise ConnectionError("http://u:hunter2@host:1 refused")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert records[0] == "connecting to http://***@host:1"
    assert "hunter2" not in records[1] and "http://***@host:1 refused" in records[1]


def test_install_log_redaction_reaches_loggers_with_their_own_handlers(monkeypatch, caplog):
    """MLflow and Ray attach handlers to non-propagating loggers: the record factory still sees them."""
    monkeypatch.setattr(redact_module, "_installed", False)
    saved = logging.getLogRecordFactory()
    try:
        install_log_redaction()
        install_log_redaction()  # once only: no factory wrapped twice
        with caplog.at_level(logging.WARNING, logger="latentflow.test_secrets.factory"):
            logging.getLogger("latentflow.test_secrets.factory").warning("uri %s", "https://a:b@h")
    finally:
        logging.setLogRecordFactory(saved)
    assert [r.getMessage() for r in caplog.records] == ["uri https://***@h"]


# ---------------------------------------------------------------- job payloads


def test_a_job_payload_refuses_secrets_naming_the_key(monkeypatch):
    env_secret = f"s{secrets.token_hex(10)}"
    monkeypatch.setenv("LATENTFLOW_TEST_SECRET_TOKEN", env_secret)
    plain = runtime_env({"env_vars": {"OMP_NUM_THREADS": "1"}, "pip": ["einops"]})
    assert plain["env_vars"] == {"OMP_NUM_THREADS": "1"} and plain["working_dir"] == str(REPO)
    for env_vars, key in (({"MY_API_TOKEN": "tok-abc"}, "MY_API_TOKEN"), ({"COPY": env_secret}, "COPY")):
        with pytest.raises(JobError, match=f"ray.runtime_env.env_vars.{key}: looks like a secret") as refused:
            runtime_env({"env_vars": env_vars})
        assert "tok-abc" not in str(refused.value) and env_secret not in str(refused.value)
        assert "cluster's environment" in str(refused.value)

    config = str(SMOKE)
    assert "--set dit.train.max_steps=3" in entrypoint(config, ["dit.train.max_steps=3"], "wf")
    with pytest.raises(JobError, match="--set tracking.uri: looks like a secret") as refused:
        entrypoint(config, ["tracking.uri=https://user:hunter2@mlflow.example"], "wf")
    assert "hunter2" not in str(refused.value)
    with pytest.raises(JobError, match="--set ray.runtime_env.env_vars.MY_API_TOKEN"):
        entrypoint(config, ["ray.runtime_env.env_vars.MY_API_TOKEN=tok-abc"], None)


# ---------------------------------------------------------------- the CLI's printed errors


def test_printed_errors_hide_a_url_password(tmp_path):
    password = f"pw{secrets.token_hex(8)}"
    bad_value = latentflow("run", str(SMOKE), "--set", f"storage.root={tmp_path}",
                           "--set", f"shard.max_samples=http://user:{password}@host", timeout=120)
    assert bad_value.returncode == 2 and "shard.max_samples" in bad_value.stderr
    assert "http://***@host" in bad_value.stderr
    # an unreachable tracking server: MLflow's own exception, printed by the CLI's excepthook
    port = free_port()
    unreachable = latentflow("run", str(SMOKE), "--only", "shard", "--set", f"storage.root={tmp_path}",
                             "--set", f"tracking.uri=http://user:{password}@127.0.0.1:{port}",
                             env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"},
                             timeout=120)
    assert unreachable.returncode != 0 and f"127.0.0.1:{port}" in unreachable.stderr
    for out in (bad_value, unreachable):
        assert password not in out.stdout + out.stderr


# ---------------------------------------------------------------- a real run


def around(data: bytes, secret: str) -> bytes:
    """Where a leak is, for the failure message."""
    at = data.find(secret.encode())
    return data[max(0, at - 120): at + 60]


def all_bytes_under(path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def mlflow_server_records(url: str, workflow_id: str) -> tuple[list, dict[str, bytes]]:
    """(the workflow's runs, {artifact path: content}) as the server returns them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("latentflow-smoke")
    runs = client.search_runs([experiment.experiment_id], f"tags.`latentflow.workflow_id` = '{workflow_id}'")
    contents = {}
    for run in runs:
        pending = [None]
        while pending:
            for item in client.list_artifacts(run.info.run_id, pending.pop()):
                if item.is_dir:
                    pending.append(item.path)
                else:
                    local = client.download_artifacts(run.info.run_id, item.path)
                    contents[f"{run.info.run_id}/{item.path}"] = open(local, "rb").read()
    return runs, contents


def s3_bucket_bytes(bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.integration
def test_three_planted_secrets_leave_no_trace(mlflow_server, tmp_path, tmp_path_factory):
    config_secret = f"tok-{secrets.token_hex(12)}"  # under a secret-named key: the key rule
    url_password = f"pw{secrets.token_hex(10)}"  # in tracking.uri's userinfo: the URL rule
    env_secret = f"env{secrets.token_hex(10)}"  # in the environment, copied under a plain key: the env rule
    planted = (config_secret, url_password, env_secret)
    host_port = mlflow_server.split("://", 1)[1]
    root = tmp_path / "out"
    done = latentflow("run", str(SMOKE), "--only", "shard", "--workflow-id", "secrets-wf",
                      "--set", f"storage.root={root}", "--set", "shard.max_samples=40",
                      "--set", "shard.samples_per_shard=20",
                      # MLflow takes userinfo in the URI: requests sends it as basic auth, the server ignores it
                      "--set", f"tracking.uri=http://latentflow:{url_password}@{host_port}",
                      "--set", f"ray.runtime_env.env_vars.MY_API_TOKEN={config_secret}",
                      "--set", f"ray.runtime_env.env_vars.LATENTFLOW_ECHO={env_secret}",
                      env={"LATENTFLOW_TEST_SECRET_TOKEN": env_secret}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs, artifacts = mlflow_server_records(mlflow_server, "secrets-wf")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    # the planted values were logged, redacted: their absence below is not for want of trying
    assert parent.data.params["tracking.uri"] == f"http://***@{host_port}"
    assert parent.data.params["ray.runtime_env.env_vars.MY_API_TOKEN"] == MASK
    assert parent.data.params["ray.runtime_env.env_vars.LATENTFLOW_ECHO"] == MASK
    assert {r.data.tags.get("latentflow.step") for r in runs} == {None, "shard"}
    assert any(path.endswith("resolved_config.json") for path in artifacts)

    server_dbs = list(tmp_path_factory.getbasetemp().glob("mlflow-server*/mlflow.db"))
    places = {
        "storage root": all_bytes_under(root),
        "mlflow server database": {str(p): p.read_bytes() for p in server_dbs},
        "mlflow artifacts (S3)": s3_bucket_bytes(ARTIFACT_BUCKET),
        "mlflow artifacts (server)": artifacts,
        "mlflow params, tags, names": {r.info.run_id: repr((r.data.params, r.data.tags, r.info.run_name)).encode()
                                       for r in runs},
        "cli output": {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()},
    }
    assert places["storage root"] and server_dbs
    assert any("/logs/" in name for name in places["storage root"])  # the driver's log file was looked in too
    leaks = [(where, name, around(data, secret)) for where, files in places.items() for name, data in files.items()
             for secret in planted if secret.encode() in data]
    assert leaks == []
