"""A text-conditioned DiT as an MLflow model: logged with its joint encoder's tokenizer (or a frozen
encoder's directory bundled inside, checked against the sha256 the DiT step recorded), registered,
loaded with ``mlflow.pyfunc`` and asked for prompts: the same images as the repository's own
``generate`` with those prompts; and ``latentflow sample --model ... --prompt`` (its function) writes
them. The step's own files are removed before loading: the model must come from MLflow alone."""

from __future__ import annotations

import json
import os
import shutil
import time

import pandas as pd
import pytest
import torch

from components.common.step import FileRecord, Manifest
from components.common.storage import Storage
from components.dit.config import SamplingConfig
from components.dit.generate import generate
from components.dit.load import DIT_META, DIT_RAW_WEIGHTS, DIT_WEIGHTS, load_dit
from components.dit.task import LatentDitTask
from components.dit.text_model import text_dit_arguments
from components.dit.train import build_step_dit
from components.serving.generator import png
from components.serving.log import bundle_frozen_encoder
from components.text.config import TextEncoderConfig
from components.text.frozen import directory_digests
from components.text.load import TOKENIZER_FILE, build_text_encoder
from pipelines.models import MODEL_ID_KEY, try_log_step_model
from pipelines.sample import BadFlag
from pipelines.sample_prompts import sample_prompts
from test_dit import CLASSES, LATENT, untrained_autoencoder_manifest
from test_dit_text import captioned_latents, text_cfg, text_task
from test_text_encoder import save_tiny_model
import metas

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
SAMPLING = {"steps": 3, "guidance": 2.0, "seed": 0}
PROMPTS = ["a thin zero", "a thick two"]


def exported_manifest(task: LatentDitTask, out, run_id: str) -> Manifest:
    """The task's export (untrained, perturbed so that prompts matter) as a DiT step's manifest."""
    torch.manual_seed(3)
    model = task.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out.mkdir()
    task.export(model.eval(), model.eval(), out)
    storage = Storage.from_uri(str(out))
    names = [DIT_WEIGHTS, DIT_RAW_WEIGHTS, DIT_META] + ([TOKENIZER_FILE] if task.tokenizer_json else [])
    return Manifest(step="dit", cache_key="k", code_version="1", location=str(out), config={}, upstream={},
                    files=[FileRecord(p, storage.sha256(p), storage.size(p)) for p in names],
                    mlflow_run_id=run_id, workflow_id="wf")


def frozen_cfg(directory):
    return text_cfg().model_copy(update={"text": TextEncoderConfig(kind="frozen_clip", path=str(directory), max_tokens=8)})


def frozen_task(directory) -> LatentDitTask:
    cfg = frozen_cfg(directory)
    arguments = text_dit_arguments(build_text_encoder(cfg.text))
    kwargs = build_step_dit(cfg, LATENT, None, arguments).arguments
    meta = metas.dit_meta(schedule=cfg.schedule, num_timesteps=cfg.num_timesteps, prediction=cfg.prediction,
                          learn_sigma=False, num_classes=3, null_label=None, latent_shape=list(LATENT), model=kwargs,
                          text=cfg.text.model_dump(mode="json"), conditioning="text", sampling=SAMPLING,
                          text_encoder_files=directory_digests(directory))
    return LatentDitTask(cfg, kwargs, meta.to_json(), in_memory=captioned_latents())


def joint_task() -> LatentDitTask:
    task = text_task(text_cfg(), captioned_latents())
    task.meta |= {"sampling": SAMPLING, "grid_prompts": PROMPTS}
    return task


def register(mlflow_server, manifest: Manifest, ae: Manifest, client) -> str:
    try_log_step_model(mlflow_server, manifest, {"autoencoder": ae})  # what the step task does
    model_id = manifest.info[MODEL_ID_KEY]
    name = f"serving-text-{time.time_ns()}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=manifest.mlflow_run_id,
                                          model_id=model_id, tags={"latentflow.step": "dit"})  # as `register` tags it
    client.set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


@pytest.mark.parametrize("encoder", ["joint", "frozen_clip"])
def test_a_registered_text_dit_answers_prompts_with_the_repository_images(mlflow_server, tmp_path, encoder):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"serving-text-{os.getpid()}-{time.time_ns()}")).info.run_id
    root = tmp_path / "root"
    root.mkdir()
    frozen_dir = tmp_path / "clip"
    if encoder == "frozen_clip":
        save_tiny_model(frozen_dir, "frozen_clip")
    task = joint_task() if encoder == "joint" else frozen_task(frozen_dir)
    ae = untrained_autoencoder_manifest(root, CLASSES)
    dit_manifest = exported_manifest(task, root / "dit", run_id)
    model_uri = register(mlflow_server, dit_manifest, ae, client)

    from components.autoencoder.load import load_autoencoder

    dit, meta = load_dit(dit_manifest)
    ae_model, ae_meta = load_autoencoder(ae)
    request = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    def drawn(prompts):
        return [png(image) for image in generate(dit, meta, ae_model, ae_meta, None, SamplingConfig(**SAMPLING),
                                                 prompts=prompts)]

    want, swapped = drawn(request), drawn([PROMPTS[1], PROMPTS[1], PROMPTS[1]])
    assert want[0] != swapped[0] and want[1] == swapped[1]  # the prompt, not only the noise, decides the image
    shutil.rmtree(root)
    shutil.rmtree(frozen_dir, ignore_errors=True)  # a frozen encoder must travel inside the model

    mlflow.set_tracking_uri(mlflow_server)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["prompt", "seed", "steps", "guidance"]
    answer = model.predict(pd.DataFrame({"prompt": request, "seed": [0, 0, 0]}))
    assert list(answer["prompt"]) == request and list(answer["image"]) == want
    with pytest.raises(Exception, match="prompt"):
        model.predict(pd.DataFrame({"label": [1], "seed": [0]}))

    result = sample_prompts(None, request[:2], None, 1, tmp_path / "out", model=model_uri, tracking_uri=mlflow_server,
                            steps=SAMPLING["steps"], guidance=SAMPLING["guidance"], seed=0, progress=False)
    assert [(tmp_path / "out" / str(k) / "0.png").read_bytes() for k in (0, 1)] == want[:2]
    assert json.loads((tmp_path / "out" / "prompts.json").read_text())["model"] == model_uri
    assert result.classes == request[:2]
    with pytest.raises(BadFlag, match="class-conditional|text-conditioned"):
        from pipelines.sample_registered import sample_registered

        sample_registered(model_uri, mlflow_server, "0", 1, tmp_path / "labels", None, None, None, None, 0, 8, "cpu")


def test_a_frozen_encoder_that_changed_since_training_is_refused_by_file(tmp_path):
    directory = tmp_path / "clip"
    save_tiny_model(directory, "frozen_clip")
    task = frozen_task(directory)
    manifest = exported_manifest(task, tmp_path / "dit", "run")
    assert load_dit(manifest)[0].encoder.kind == "frozen_clip"  # as recorded: loads
    (directory / "tokenizer.json").write_text((directory / "tokenizer.json").read_text().replace("thick", "thicc"))
    with pytest.raises(ValueError, match=r"dit\.text\.path: .*tokenizer\.json differs from the sha256 recorded"):
        load_dit(manifest)
    with pytest.raises(ValueError, match="tokenizer.json differs"):
        bundle_frozen_encoder(task.meta, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_a_frozen_encoder_with_pickled_weights_is_refused(tmp_path):
    directory = tmp_path / "clip"
    save_tiny_model(directory, "frozen_clip")
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pickled weights \(pytorch_model\.bin\).*safetensors"):
        build_text_encoder(frozen_cfg(directory).text)
