"""Warm starts from the MLflow Model Registry: a learned step may begin from the weights of a
registered model (``warm_start: models:/mnist-dit@champion``) instead of a fresh initialisation.

``latentflow retrain`` records each version's step manifest (tag ``latentflow.manifest_uri``), so
the weights are read from the step's output in storage, checked against the sha256 that manifest
recorded (safetensors, never pickles). With no such model yet (the first
scheduled run has no champion) the step trains from scratch and says so; either way the choice is
recorded in the step's meta and MLflow tags. The alias is resolved when the step runs: the cache key
holds the ``models:/`` URI, not the version, so a step re-runs when its data or config change, not
merely because the champion moved.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.common.step import FileRef

log = logging.getLogger(__name__)


def resolve_registered(tracking_uri: str, model_uri: str):
    """The ModelVersion of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; None if it does
    not exist (yet). A malformed URI is an error."""
    from mlflow.exceptions import MlflowException

    from components.common.tracking import client_for

    if not model_uri.startswith("models:/") or ("@" not in model_uri and model_uri.count("/") < 2):
        raise ValueError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    spec = model_uri.removeprefix("models:/")
    client = client_for(tracking_uri)
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, number = spec.rsplit("/", 1)
        return client.get_model_version(name, number)
    except MlflowException:
        return None


def warm_start_source(tracking_uri: str | None, model_uri: str | None, weights_name: str
                      ) -> tuple["FileRef | None", dict[str, Any]]:
    """(the weights file to initialise from, with the sha256 its step's manifest recorded, or None;
    what to record)."""
    if not model_uri:
        return None, {}
    if not tracking_uri:
        raise ValueError(f"warm_start {model_uri}: the step has no MLflow tracking URI to find it in")
    version = resolve_registered(tracking_uri, model_uri)
    if version is None:
        log.warning("warm_start: %s is not in the registry (yet): training from scratch", model_uri)
        return None, {"warm_start": model_uri, "warm_start_version": "none: trained from scratch"}
    from components.common.step import FileRef, read_manifest_at

    log.info("warm_start: initialising from %s = %s v%s (%s)", model_uri, version.name, version.version, version.source)
    manifest_uri = step_manifest_uri(version)
    try:
        ref = FileRef.of(read_manifest_at(manifest_uri), weights_name)
    except KeyError:
        raise ValueError(f"warm_start {model_uri}: its step's manifest ({manifest_uri}) lists no {weights_name}") from None
    return ref, {"warm_start": model_uri, "warm_start_version": f"{version.name}/{version.version}",
                 "warm_start_source": manifest_uri.rsplit("/", 1)[0]}


def step_manifest_uri(version) -> str:
    """The manifest of the step a version was registered from. Versions are ``models:/<model id>``
    (an MLflow LoggedModel) with the manifest in a tag; older ones had the step's location as source."""
    tagged = dict(version.tags or {}).get("latentflow.manifest_uri")
    if tagged:
        return tagged
    if version.source.startswith("models:/"):
        raise ValueError(f"{version.name} v{version.version}: no latentflow.manifest_uri tag; register it again "
                         "with `latentflow retrain`")
    return f"{version.source.rstrip('/')}/manifest.json"


def load_into(model, ref: "FileRef | None"):
    """``model`` with the weights at ``ref`` loaded, verified against their recorded sha256 (shapes
    must match the registered model's)."""
    if ref is None:
        return model
    import safetensors.torch

    weights = safetensors.torch.load(ref.read())
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"warm_start: the weights at {ref.directory}/{ref.name} do not fit this model "
                         f"(architecture changed?): {str(e)[:300]}") from None
    return model
