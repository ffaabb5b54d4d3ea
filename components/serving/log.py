"""Logging trained components as MLflow 3 LoggedModels linked to their step's run.

A generator (autoencoder + DiT or distilled student) is a ``pyfunc`` model (``generator.py``): an
MLmodel, a signature and an input example, the weights as safetensors artifacts, and this
repository's ``components`` package as its code (a model from code: ``generator_model.py``, so
loading it unpickles nothing), so ``mlflow.pyfunc.load_model`` and ``mlflow
models serve --env-manager local`` need nothing but the installed packages. Other components
(autoencoder, super-resolution stages, noisy classifier) are LoggedModels whose artifacts are their
weight and meta files: visible and downloadable from the run, not callable on their own.

Everything goes through ``MlflowClient`` with the step's run id (no fluent run state: this runs in
a step's Ray task, whose process Ray reuses).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from components.dit.config import meta_uses_classes, meta_uses_text
from components.serving.generator import (AUTOENCODER_ARTIFACT, DENOISER_ARTIFACT, KIND_FILE, TEXT_ENCODER_DIR,
                                          condition_columns)

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.dit.load import DitMeta

REPO = Path(__file__).resolve().parents[2]
GENERATOR_MODEL_TYPE = "latentflow-generator"


def copy_component(manifest: "Manifest", names: list[str], into: Path) -> Path:
    """The named output files of a step (each verified against its manifest) and the manifest."""
    into.mkdir(parents=True, exist_ok=True)
    for name in names:
        (into / name).write_bytes(manifest.read_verified(name))
    (into / "manifest.json").write_text(manifest.to_json())
    return into


def generator_signature(with_guidance: bool, columns: tuple[str, ...] | list[str] = ("label",)):
    """The pyfunc signature: the condition ``columns`` (label, prompt, or both for a class+text DiT),
    then the optional seed, steps and (a DiT's) guidance; the answer echoes the conditions beside the image."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    conditions = [ColSpec("long", "label") if name == "label" else ColSpec("string", "prompt") for name in columns]
    inputs = [*conditions, ColSpec("long", "seed", required=False), ColSpec("long", "steps", required=False)]
    if with_guidance:
        inputs.append(ColSpec("double", "guidance", required=False))
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([*conditions, ColSpec("binary", "image")]))


def generator_example(kind: str, meta: "DitMeta | dict", sampling: dict | None):
    import pandas as pd

    from components.distill.load import StudentMeta
    from components.dit.load import DitMeta

    meta = (StudentMeta if kind == "distill" else DitMeta).of(meta)  # typed, or its JSON form
    example = {}
    if meta.uses_text:
        prompts = list(meta.grid_prompts or ["a digit"])[:2]
        example["prompt"] = prompts
        if meta.uses_classes:  # class+text: each grid prompt with its own label
            example["label"] = [int(k) for k in (meta.grid_labels or [0] * len(prompts))[:len(prompts)]]
    else:
        example["label"] = list(range(min(2, int(meta.num_classes))))
    rows = len(example["prompt"] if "prompt" in example else example["label"])
    example["seed"] = [0] * rows
    if kind == "dit":
        sampling = sampling or meta.sampling or {}
        example["steps"] = [int(sampling.get("steps", 50))] * rows
        example["guidance"] = [float(sampling.get("guidance", 0.0))] * rows
    else:
        example["steps"] = [int(meta.native_steps)] * rows
    return pd.DataFrame(example)


def bundle_frozen_encoder(meta: "DitMeta | dict", into: Path) -> None:
    """A frozen text encoder's directory copied into the model (a served model cannot reach the training
    cluster's disk), checked against the sha256 of its files that the DiT step recorded (a student's
    distill.json carries its teacher's)."""
    from components.dit.load import DitMeta
    from components.text.frozen import verify_directory

    meta = DitMeta.of(meta)  # typed, or its JSON form
    text = meta.text or {}
    if text.get("kind", "joint") == "joint":
        return
    recorded = meta.text_encoder_files
    if recorded is None:
        raise ValueError("dit.json records no sha256 of the frozen text encoder's files (a DiT trained before "
                         "they were recorded): retrain it to serve it")
    verify_directory(text["path"], recorded, "dit.text.path")
    shutil.copytree(Path(text["path"]).expanduser(), into / TEXT_ENCODER_DIR)


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    packages = ("mlflow", "torch", "safetensors", "numpy", "pillow", "pydantic", "pyyaml", "pandas")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]  # "+cpu": not a GPU host's build


def quiet_artifact_copies() -> None:
    """MLflow draws a progress bar for every local copy of a few files: not worth a console line."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _new_logged_model(client, run_id: str, name: str, model_type: str, tags: dict[str, str]):
    run = client.get_run(run_id)
    return client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags,
                                      model_type=model_type)


def _publish(client, model, run_id: str, directory: Path) -> str:
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client.log_model_artifacts(model.model_id, str(directory))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def log_generator(client, run_id: str, name: str, kind: str, ae: "Manifest", ae_files: list[str],
                  denoiser: "Manifest", denoiser_files: list[str], meta: "DitMeta", tags: dict[str, str],
                  sampling: dict | None = None) -> str:
    """The generator's model id. ``kind``: "dit" or "distill"; ``sampling``: a DiT's default settings."""
    import json

    import mlflow.pyfunc
    from mlflow.models import Model

    quiet_artifact_copies()
    model = _new_logged_model(client, run_id, name, GENERATOR_MODEL_TYPE, tags)
    with tempfile.TemporaryDirectory(prefix="latentflow-model-") as tmp:
        staged = Path(tmp)
        ae_dir = copy_component(ae, ae_files, staged / AUTOENCODER_ARTIFACT)
        denoiser_dir = copy_component(denoiser, denoiser_files, staged / DENOISER_ARTIFACT)
        (denoiser_dir / KIND_FILE).write_text(json.dumps({"kind": kind, "sampling": sampling}))
        bundle_frozen_encoder(meta, denoiser_dir)
        code = staged / "code" / "components"
        shutil.copytree(REPO / "components", code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        mlflow.pyfunc.save_model(
            path=str(staged / "model"), python_model=str(Path(__file__).with_name("generator_model.py")),
            artifacts={AUTOENCODER_ARTIFACT: str(ae_dir), DENOISER_ARTIFACT: str(denoiser_dir)},
            code_paths=[str(code)], signature=generator_signature(kind == "dit", condition_columns(meta)),
            input_example=generator_example(kind, meta, sampling), pip_requirements=pip_requirements(),
            mlflow_model=Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                               model_id=model.model_id))
        return _publish(client, model, run_id, staged / "model")


def log_component(client, run_id: str, name: str, model_type: str, manifest: "Manifest", files: list[str],
                  tags: dict[str, str]) -> str:
    """A component that is not a generator on its own: its files as the LoggedModel's artifacts."""
    quiet_artifact_copies()
    model = _new_logged_model(client, run_id, name, model_type, tags)
    with tempfile.TemporaryDirectory(prefix="latentflow-model-") as tmp:
        return _publish(client, model, run_id, copy_component(manifest, files, Path(tmp) / name))
