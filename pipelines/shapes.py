"""The models follow the data, checked at plan time.

Every model's channels, class count and sizes come from what is upstream of it: the shards'
channels (``shard.channels``) and classes (the source's class folders), the autoencoder's latent
channels and grid, a stage's sizes. A ``<section>.model`` that sets one of these anyway must
agree, or the plan refuses before any step runs, naming both settings. The steps make the same
check against the manifests they read (``components/common/model_args.py``), which also covers
what only they can know (a class count in S3 or inside webdataset tars).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


def check_models_follow_data(config: PipelineConfig) -> None:
    """Raise ValueError naming each ``<section>.model.<argument>`` that disagrees, both values, and
    the setting or data the right value comes from."""
    for section, model, fixed in data_fixed_arguments(config):
        clash = [f"{section}.model.{k} is {model[k]}, but the data has {value} ({source})"
                 for k, (value, source) in fixed.items() if k in model and model[k] != value]
        if clash:
            raise ValueError("; ".join(clash) + f". These follow the data: remove them from {section}.model")


def data_fixed_arguments(config: PipelineConfig) -> list[tuple[str, dict[str, Any], dict[str, tuple[Any, str]]]]:
    """(section, its ``model`` settings, {argument: (the data's value, where it comes from)}) for each
    learned step; a class count is left out where it cannot be known before the shard step runs."""
    from components.shard.source_probe import planned_class_count

    channels = (config.shard.channels, "shard.channels")
    count = planned_class_count(config.shard.source)
    where_classes = f"the classes of shard.source {config.shard.source!r}"
    found: list[tuple[str, dict[str, Any], dict[str, tuple[Any, str]]]] = []
    if config.autoencoder is not None:
        found.append(("autoencoder", config.autoencoder.model, {"in_channels": channels}))
    latent = latent_arguments(config)
    if config.dit is not None and latent:
        fixed = dict(latent)
        if count is not None:
            fixed["num_classes"] = (count or 1, where_classes)  # unlabelled data: one class, the null one beside it
        found.append(("dit", config.dit.model, fixed))
    if config.noisy_classifier is not None and latent:
        fixed = {"in_channels": latent["in_channels"]}
        if count is not None:
            fixed["num_classes"] = (count, where_classes)
        found.append(("noisy_classifier", config.noisy_classifier.model, fixed))
    for k, stage in enumerate(config.superres or []):
        fixed = {"in_channels": channels, "out_size": (stage.output_size, f"superres.{k}.output_size")}
        if not stage.class_conditional:
            fixed["num_classes"] = (0, f"superres.{k}.class_conditional is false")
        elif count is not None:
            fixed["num_classes"] = (count, where_classes)
        if stage.text is None:  # the pooled text width follows the stage's encoder
            fixed["pooled_dim"] = (0, f"superres.{k}.text is unset")
        elif stage.text.kind == "joint":
            fixed["pooled_dim"] = (stage.text.width, f"superres.{k}.text.width")
        found.append((f"superres.{k}", stage.model, fixed))
    return found


def latent_arguments(config: PipelineConfig) -> dict[str, tuple[Any, str]]:
    """The latent grid's channels and side, from the autoencoder's preset and settings and the base
    size; empty where those are not plain numbers (the autoencoder step names the problem)."""
    from components.autoencoder.presets import AUTOENCODER_PRESETS

    ae = config.autoencoder
    if ae is None or ae.preset not in AUTOENCODER_PRESETS:
        return {}
    settings = {**AUTOENCODER_PRESETS[ae.preset], **ae.model}
    mult, latent_channels = settings.get("channel_mult"), settings.get("latent_channels")
    if not isinstance(mult, (list, tuple)) or not mult or not isinstance(latent_channels, int):
        return {}
    f = 2 ** (len(mult) - 1)
    from_ae = ("autoencoder.model.latent_channels" if "latent_channels" in ae.model
               else f"the latent channels of autoencoder.preset {ae.preset!r}")
    size_key = "autoencoder.image_size" if ae.image_size else "shard.image_size"
    return {"in_channels": (latent_channels, from_ae),
            "input_size": (config.base_size // f, f"{size_key} {config.base_size} / the autoencoder's f={f}")}
