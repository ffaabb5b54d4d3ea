"""Warm starts from the MLflow Model Registry: a learned step may begin from the weights of a
registered model (``warm_start: models:/mnist-dit@champion``) instead of a fresh initialisation.

``latentflow retrain`` registers each step's output location as the version's source, so the
weights are read from there (safetensors, never pickles). With no such model yet (the first
scheduled run has no champion) the step trains from scratch and says so; either way the choice is
recorded in the step's meta and MLflow tags. The alias is resolved when the step runs: the cache key
holds the ``models:/`` URI, not the version, so a step re-runs when its data or config change, not
merely because the champion moved.
"""

from __future__ import annotations

import logging
from typing import Any

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
                      ) -> tuple[tuple[str, str] | None, dict[str, Any]]:
    """((directory URI, weights file) to initialise from, or None; what to record)."""
    if not model_uri:
        return None, {}
    if not tracking_uri:
        raise ValueError(f"warm_start {model_uri}: the step has no MLflow tracking URI to find it in")
    version = resolve_registered(tracking_uri, model_uri)
    if version is None:
        log.warning("warm_start: %s is not in the registry (yet): training from scratch", model_uri)
        return None, {"warm_start": model_uri, "warm_start_version": "none: trained from scratch"}
    log.info("warm_start: initialising from %s = %s v%s (%s)", model_uri, version.name, version.version, version.source)
    return (version.source, weights_name), {"warm_start": model_uri, "warm_start_version": f"{version.name}/{version.version}",
                                            "warm_start_source": version.source}


def load_into(model, ref: tuple[str, str] | None):
    """``model`` with the weights at ``ref`` loaded (shapes must match the registered model's)."""
    if ref is None:
        return model
    import safetensors.torch

    from components.common.storage import Storage

    directory, name = ref
    weights = safetensors.torch.load(Storage.from_uri(directory).read_bytes(name))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"warm_start: the weights at {directory}/{name} do not fit this model "
                         f"(architecture changed?): {str(e)[:300]}") from None
    return model
