"""What the data fixes in a model's arguments, and the one way a config may disagree with it.

A model's channels, class count and sizes follow the data (the shard manifest, the latent shape,
the stage's sizes); a config that sets one of them anyway must agree. The plan checks this before
any work (``pipelines/shapes.py``); each step checks it again against the manifests it reads."""

from __future__ import annotations

from typing import Any


def with_data_fixed(section: str, model: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """``fixed`` with ``model``'s settings for the same arguments, refused where they disagree:
    the error names ``<section>.model.<argument>``, its value and the data's."""
    clash = {k: v for k, v in model.items() if k in fixed and v != fixed[k]}
    if clash:
        said = ", ".join(f"{section}.model.{k}: {v} (the data gives {fixed[k]})" for k, v in clash.items())
        raise ValueError(f"{said}; these follow the data: remove the setting(s) from {section}.model")
    return dict(fixed)
