"""The MLflow UI as a user sees it, in headless Chromium (Debian's ``chromium``; ``make test``
installs it where it can), on the session's finished smoke workflow: the runs page, the DiT step's
run with its sample grid, and the registered generator's page. Screenshots are kept as test
artifacts under ``test-artifacts/mlflow-ui/`` (``LATENTFLOW_TEST_ARTIFACTS`` moves them).

Runs after tests/test_pipeline.py, which registers the smoke models; alone, it registers them itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, latentflow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                                           "chromium); the MLflow UI check needs a browser")]
ARTIFACTS = Path(os.environ.get("LATENTFLOW_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow-ui"
# MLflow 3's UI keeps a per-browser "workflow type" (GenAI by default); a model-training link says so
TRAINING_VIEW = "workflowType=machine_learning"


def browse(url: str, name: str) -> tuple[str, str, str]:
    """(page title, visible text, DOM) of ``url`` once its scripts have run; a screenshot beside."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=20000", "--window-size=1400,1000"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*base, f"--screenshot={ARTIFACTS / name}", url], capture_output=True, timeout=120)
    assert (ARTIFACTS / name).stat().st_size > 10_000, f"{name}: no screenshot"
    title = re.search(r"<title>(.*?)</title>", dom, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S))
    return (title.group(1).strip() if title else ""), " ".join(text.split()), dom


def test_the_mlflow_ui_shows_runs_grids_and_the_champion(mlflow_server, smoke_on_s3):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    root, s3_env, first = smoke_on_s3
    assert first.returncode == 0, first.stderr[-2000:]
    client = MlflowClient(mlflow_server)
    try:
        champion = client.get_model_version_by_alias("smoke-dit", "champion")
    except MlflowException:  # run alone: register as `latentflow retrain` does
        retrained = latentflow("retrain", str(REPO / "configs" / "pipeline" / "smoke.yaml"), "--set",
                               f"storage.root={root}", "--set", f"tracking.uri={mlflow_server}", env=s3_env)
        assert retrained.returncode == 0, retrained.stderr[-2000:]
        champion = client.get_model_version_by_alias("smoke-dit", "champion")
    experiment = client.get_experiment_by_name("latentflow-smoke")
    dit_run = client.get_run(champion.run_id)

    title, text, _ = browse(f"{mlflow_server}/#/experiments/{experiment.experiment_id}?{TRAINING_VIEW}", "runs.png")
    assert title.startswith("Runs - "), title
    # the model-training view of the experiment, its workflow runs listed (step runs nest under them)
    for expected in ("latentflow-smoke", "Model training", "smoke-wf-one", "Dataset"):
        assert expected in text, expected

    title, text, dom = browse(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{dit_run.info.run_id}"
                         f"/artifacts/samples.png?{TRAINING_VIEW}", "dit-run-samples.png")
    assert dit_run.info.run_id in title or "dit" in title, title
    assert "dit.json" in text and '<img alt="samples.png"' in dom  # the grid itself is on the page

    title, text, _ = browse(f"{mlflow_server}/#/models/smoke-dit?{TRAINING_VIEW}", "registered-model.png")
    assert "smoke-dit" in title, title
    assert "champion" in text and f"Version {champion.version}" in text
    (ARTIFACTS / "pages.json").write_text(json.dumps({"champion": champion.version, "run": dit_run.info.run_id}))
