"""The generator as an MLflow model: logged from a step on a LOCAL storage root to a real http
``mlflow server`` (artifacts in S3), registered, then loaded with ``mlflow.pyfunc.load_model`` and
served by ``mlflow models serve --env-manager local``, after the step's own files are gone: the
model lives in MLflow, not at the step's location. The images are the repository code's own, byte
for byte, and a tampered weight file is refused by name.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

from components.common.step import FileRecord, IntegrityError, Manifest
from components.common.storage import Storage
from components.dit.load import DIT_META, DIT_RAW_WEIGHTS
from components.dit.task import LatentDitTask
from components.dit.train import build_step_dit
from components.serving.generator import load_generator, png
from components.serving.log import copy_component
from conftest import REPO as REPO_ROOT, free_port, wait_for_http
import metas
from pipelines.models import MODEL_ID_KEY, try_log_step_model
from test_dit import CLASSES, LATENT, dit_cfg, untrained_autoencoder_manifest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
SAMPLING = {"steps": 3, "guidance": 1.5, "seed": 0}


def untrained_dit_manifest(root, ae: Manifest, run_id: str) -> Manifest:
    """A DiT step's output (untrained, perturbed so labels matter) as the step task describes it."""
    cfg = dit_cfg()
    kwargs = build_step_dit(cfg, LATENT, len(CLASSES)).arguments
    meta = metas.dit_meta(model=kwargs, num_classes=len(CLASSES), classes=CLASSES, null_label=len(CLASSES),
                          latent_shape=LATENT, sampling=SAMPLING)
    task = LatentDitTask(cfg, kwargs, meta.to_json())
    torch.manual_seed(3)
    model = task.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = root / "dit"
    out.mkdir()
    task.export(model.eval(), model.eval(), out)
    storage = Storage.from_uri(str(out))
    files = [FileRecord(p, storage.sha256(p), storage.size(p)) for p in ("dit.safetensors", DIT_RAW_WEIGHTS, DIT_META)]
    return Manifest(step="dit", cache_key="k", code_version="1", location=str(out), config={}, upstream={},
                    files=files, mlflow_run_id=run_id, workflow_id="wf")


def test_a_logged_generator_loads_serves_and_answers_with_the_same_images(mlflow_server, tmp_path):
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"serving-{os.getpid()}-{time.time_ns()}")
    run_id = client.create_run(experiment).info.run_id
    root = tmp_path / "root"
    root.mkdir()
    ae = untrained_autoencoder_manifest(root, CLASSES)
    dit = untrained_dit_manifest(root, ae, run_id)
    try_log_step_model(mlflow_server, dit, {"autoencoder": ae})  # what the step task does
    model_id = dit.info[MODEL_ID_KEY]
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    assert model_id in [m.model_id for m in client.get_run(run_id).outputs.model_outputs]
    name = f"serving-dit-{time.time_ns()}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    client.set_registered_model_alias(name, "champion", version.version)

    expected = staged_generator(root, ae, dit)  # the repository's code on the step's own files
    request = pd.DataFrame({"label": [2, 0, 2], "seed": [0, 0, 0]})
    want = [png(image) for image in expected.images([2, 0, 2], seed=0)]
    shutil.rmtree(root)  # from here on the model must come from MLflow alone

    mlflow.set_tracking_uri(mlflow_server)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["label", "seed", "steps", "guidance"]
    answer = model.predict(request)
    assert list(answer["label"]) == [2, 0, 2] and list(answer["image"]) == want
    assert answer["image"][0] != answer["image"][1]  # labels matter

    port = free_port()
    log_path = tmp_path / "serve.log"
    # as in an activated venv: MLflow's scoring server execs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, log_path, 240, "`mlflow models serve`")
        body = json.dumps({"dataframe_records": request.to_dict(orient="records")}).encode()
        reply = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}),
            timeout=120)
        predictions = json.loads(reply.read())["predictions"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert [p["label"] for p in predictions] == [2, 0, 2]
    assert [base64.b64decode(p["image"]) for p in predictions] == want


def staged_generator(root, ae: Manifest, dit: Manifest):
    """The generator from the step's own files, staged as a logged model holds them."""
    copy_component(ae, ["autoencoder.safetensors", "autoencoder.json"], root / "staged" / "autoencoder")
    copy_component(dit, ["dit.safetensors", DIT_META], root / "staged" / "dit")
    (root / "staged" / "dit" / "generator.json").write_text(json.dumps({"kind": "dit", "sampling": SAMPLING}))
    return load_generator(root / "staged" / "autoencoder", root / "staged" / "dit")


def test_a_changed_weight_file_is_refused_by_name(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    ae = untrained_autoencoder_manifest(root, CLASSES)
    staged_generator(root, ae, untrained_dit_manifest(root, ae, "run"))  # loads as written
    weights = root / "staged" / "dit" / "dit.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="dit.safetensors"):
        load_generator(root / "staged" / "autoencoder", root / "staged" / "dit")


def test_importing_the_tracking_module_leaves_telemetry_settings_alone():
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    code = "import os, components.common.tracking; print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr[-2000:]
