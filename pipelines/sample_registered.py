"""``latentflow sample --model models:/NAME@ALIAS``: images of a registered DiT or distilled student,
the pyfunc generator it was logged as (``components.serving``), downloaded from the registry, its files
checked against their manifests' sha256."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from components.dit.config import SamplingConfig
from pipelines.sample import BadFlag, SampleError, SampleResult, finish, parse_labels, sampling_config


def sample_registered(model_uri: str, tracking_uri: str | None, labels: str, per_label: int, out,
                      steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                      eta: float | None = None, seed: int | None = None, batch_size: int = 256, device: str = "cpu",
                      sampler_options: dict[str, Any] | None = None) -> SampleResult:
    """``pipelines.sample.sample`` with a registered model: ``models:/NAME@ALIAS`` (e.g. ``@champion``) or
    ``models:/NAME/VERSION`` of a DiT or a distilled student: the pyfunc generator it was logged
    as (``components.serving``), downloaded from the registry, its files checked against their
    manifests' sha256."""
    import tempfile

    import torch

    if per_label < 1:
        raise BadFlag(f"--per-label must be at least 1, got {per_label}")
    if (sampler_options or {}).get("classifier_guidance"):
        raise BadFlag("--classifier-guidance needs the workflow's noisy_classifier step: use --workflow-id")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SampleError("--model needs the registry: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="latentflow-sample-") as tmp:
        generator = registered_generator(uri, model_uri, Path(tmp), device)
    if generator.takes_text:
        raise BadFlag(f"{model_uri} is text-conditioned: give --prompt (or --prompts) and --per-prompt, not --per-label"
                      + (" (with --labels: class+text, each prompt under each label)" if generator.takes_labels else ""))
    if generator.kind == "distill":
        from components.distill.sample import supported_steps

        steps = int(generator.meta.native_steps) if steps is None else steps
        if steps not in supported_steps(generator.meta):
            raise BadFlag(f"--steps {steps}: this student samples with {supported_steps(generator.meta)} steps")
        sampling = SamplingConfig(steps=steps, guidance=0.0, seed=0 if seed is None else seed)
    else:
        sampling = sampling_config(generator.sampling().model_dump(), sampler=sampler, steps=steps,
                                   guidance=guidance, eta=eta, seed=seed, **(sampler_options or {}))
    classes = generator.classes
    label_ids = parse_labels(labels, classes)
    label_tensor = torch.tensor(label_ids).repeat_interleave(per_label)
    if generator.kind == "distill":
        images = generator.images(label_tensor.tolist(), seed=sampling.seed, steps=steps, batch_size=batch_size)
    else:
        from components.dit.generate import generate

        images = generate(generator.denoiser, generator.meta, generator.ae, generator.ae_meta, label_tensor,
                          sampling, batch_size=batch_size)
    return finish(images, label_ids, per_label, out, classes, sampling, model_uri)


def model_artifacts(tracking_uri: str, source: str) -> str:
    """Where a version's LoggedModel (``models:/<model id>``) keeps its files. Resolved here with
    this tracking URI: MLflow would resolve a models:/ URI against the process's registry URI."""
    from components.common.tracking import client_for

    if not source.startswith("models:/"):
        return source  # a version registered before models were logged: its files' location
    return client_for(tracking_uri).get_logged_model(source[len("models:/"):]).artifact_location


def registered_generator(tracking_uri: str, model_uri: str, into: Path, device: str):
    """The ``components.serving.generator.Generator`` a registered version points at, downloaded
    into ``into`` (loaded before it is removed)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from components.common.step import IntegrityError
    from components.serving.generator import AUTOENCODER_ARTIFACT, DENOISER_ARTIFACT, load_generator
    from pipelines.registry import resolve_model

    try:
        source, tags = resolve_model(tracking_uri, model_uri)
    except ValueError as e:
        raise SampleError(str(e)) from None
    if tags.get("latentflow.step") not in ("dit", "distill"):
        raise SampleError(f"{model_uri} is a {tags.get('latentflow.step')!r} model; sampling needs a dit or distill "
                          "version")
    try:
        import mlflow.artifacts

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_artifacts(tracking_uri, source),
                                                         dst_path=str(into), tracking_uri=tracking_uri))
        artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
    except (MlflowException, OSError, KeyError) as e:
        raise SampleError(f"{model_uri}: not a latentflow generator model ({type(e).__name__}: {e}); register "
                          "it again with `latentflow retrain`") from None
    try:
        return load_generator(local / artifacts[AUTOENCODER_ARTIFACT]["path"],
                              local / artifacts[DENOISER_ARTIFACT]["path"], device=device)
    except (IntegrityError, KeyError) as e:
        raise SampleError(f"{model_uri}: {e}") from None
