"""Which step becomes which MLflow model (``components.serving``), logged when the step finishes.

The DiT and the distilled student are logged as generators (with the workflow's autoencoder
inside); the autoencoder, super-resolution stages and noisy classifier as LoggedModels of their
weight files. The model id goes into the step's manifest (``info["mlflow_model_id"]``), so a cached
step and the registry find the model its result was logged as. Tracking is best-effort here as
everywhere once a step runs: a model that cannot be logged is a warning, and registration logs it
later from the manifest (``ensure_logged``).
"""

from __future__ import annotations

import logging

from components.common.redact import redact_text
from components.common.step import Manifest

MODEL_ID_KEY = "mlflow_model_id"
GENERATOR_STEPS = ("dit", "distill")
COMPONENT_STEPS = ("autoencoder", "noisy_classifier")  # and every superres_k

log = logging.getLogger("latentflow")


def component_kind(step: str) -> str | None:
    """"generator", "component" or None (a step that is no model: shard, latents, evaluate...)."""
    if step in GENERATOR_STEPS:
        return "generator"
    if step in COMPONENT_STEPS or step.startswith("superres_"):
        return "component"
    return None


def weight_files(step: str) -> list[str]:
    """(weights, meta) a step's model is made of: the EMA weights sampling uses, and their JSON."""
    from components.autoencoder.load import AE_META, AE_WEIGHTS
    from components.distill.load import STUDENT_META, STUDENT_WEIGHTS
    from components.dit.load import DIT_META, DIT_WEIGHTS
    from components.noisy_classifier.load import META, WEIGHTS
    from components.superres.load import SR_META, SR_WEIGHTS

    files = {"autoencoder": (AE_WEIGHTS, AE_META), "dit": (DIT_WEIGHTS, DIT_META),
             "distill": (STUDENT_WEIGHTS, STUDENT_META), "noisy_classifier": (WEIGHTS, META)}
    return list(files.get(step) or (SR_WEIGHTS, SR_META))


def generator_meta(step: str, manifest: Manifest):
    """The typed meta of a generator step's denoiser: ``StudentMeta`` (distill) or ``DitMeta`` (dit)."""
    from components.distill.load import STUDENT_META, StudentMeta
    from components.dit.load import DIT_META, DitMeta

    return StudentMeta.read(manifest, STUDENT_META) if step == "distill" else DitMeta.read(manifest, DIT_META)


def log_step_model(client, manifest: Manifest, inputs: dict[str, Manifest]) -> str:
    """Log ``manifest``'s step as an MLflow model linked to its run; its model id."""
    from components.serving.log import log_component, log_generator

    step, run_id = manifest.step, manifest.mlflow_run_id
    tags = {"latentflow.step": step, "latentflow.cache_key": manifest.cache_key,
            "latentflow.workflow_id": manifest.workflow_id}
    if step in GENERATOR_STEPS:
        from components.text.load import TOKENIZER_FILE

        files = weight_files(step)
        files += [record.path for record in manifest.files_matching(TOKENIZER_FILE)]  # a joint text encoder's
        meta = generator_meta(step, manifest)
        autoencoder = inputs["autoencoder"]
        tags["latentflow.autoencoder_cache_key"] = autoencoder.cache_key
        sampling = meta.sampling or manifest.config.get("sample")
        return log_generator(client, run_id, f"{step}-generator", step, autoencoder, weight_files("autoencoder"),
                             manifest, files, meta, tags, sampling if step == "dit" else None)
    model_type = "latentflow-superres" if step.startswith("superres_") else f"latentflow-{step}"
    files = weight_files(step)
    if step.startswith("superres_"):  # a text stage's joint encoder vocabulary travels with its weights
        from components.text.load import TOKENIZER_FILE

        files += [record.path for record in manifest.files_matching(TOKENIZER_FILE)]
    return log_component(client, run_id, step, model_type, manifest, files, tags)


def try_log_step_model(tracking_uri: str | None, manifest: Manifest, inputs: dict[str, Manifest]) -> None:
    """In the step's task, before its manifest is written: record the model id in it, or warn."""
    if component_kind(manifest.step) is None or not tracking_uri or not manifest.mlflow_run_id:
        return
    from components.common.tracking import client_for

    try:
        manifest.info[MODEL_ID_KEY] = log_step_model(client_for(tracking_uri), manifest, inputs)
    except Exception as e:  # noqa: BLE001 - tracking never fails a finished step
        log.warning("MLflow: could not log step %s as a model (%s: %s); `latentflow retrain` logs it when it "
                    "registers", manifest.step, type(e).__name__, redact_text(str(e))[:300])


def ensure_logged(client, manifest: Manifest, manifests: dict[str, Manifest]) -> str:
    """The step's model id: the one its manifest recorded if the server has it, else logged now."""
    from mlflow.exceptions import MlflowException

    model_id = manifest.info.get(MODEL_ID_KEY)
    if model_id:
        try:
            client.get_logged_model(model_id)
            return model_id
        except MlflowException:
            log.warning("MLflow: model %s of step %s is not on this server; logging it again", model_id,
                        manifest.step)
    return log_step_model(client, manifest, manifests)
