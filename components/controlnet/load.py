"""Load a trained ControlNet from the ControlNet step's outputs, over the DiT it was trained on.

The step writes ``controlnet.safetensors`` (EMA weights of the branch: what sampling uses),
``controlnet_raw.safetensors`` (online weights) and ``controlnet.json`` (the control signal and its
settings, ``num_blocks``, ``control_scale``, the DiT's shapes and the sha256 of the DiT weights it
was trained on). The frozen DiT is not copied: it is read from the dit step's manifest, and a DiT
whose weights are not the recorded ones is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.common.step import read_output
from components.dit.load import SamplingFacts

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.common.storage import Storage
    from components.controlnet.model import ControlledDiT
    from components.dit.load import DitMeta

CONTROLNET_WEIGHTS = "controlnet.safetensors"
CONTROLNET_RAW_WEIGHTS = "controlnet_raw.safetensors"
CONTROLNET_META = "controlnet.json"


@dataclass(kw_only=True)
class ControlNetMeta(SamplingFacts):
    """``controlnet.json`` (built by ``components.controlnet.train.step_meta``): its DiT's sampling facts,
    then the branch's."""

    control: str  # the control signal: "edges", "blur", "low_res" or "folder"
    num_blocks: int
    control_scale: float
    dit_weights_sha256: str
    dit_step: str
    sampling: dict[str, Any]
    max_steps: int
    ema_decay: float
    # the control signal's one setting (the other signals' are not written)
    edge_threshold: float | None = None
    blur_sigma: float | None = None
    low_res_size: int | None = None
    folder: str | None = None
    parameters: int | None = None  # the branch's trainable parameters
    dit_parameters: int | None = None


def load_controlnet_meta(source: "Manifest | Storage | str") -> ControlNetMeta:
    return ControlNetMeta.read(source, CONTROLNET_META)


def dit_weights_digest(dit_manifest: "Manifest") -> str:
    from components.dit.load import DIT_WEIGHTS

    return dit_manifest.file(DIT_WEIGHTS).sha256


def load_controlnet(source: "Manifest | Storage | str", dit_manifest: "Manifest", device: str = "cpu",
                    ema: bool = True) -> tuple["ControlledDiT", ControlNetMeta, "DitMeta"]:
    """(ControlledDiT in eval mode on ``device``, its meta, the DiT's meta). ``source``: the ControlNet
    step's manifest (files checked against their sha256) or its output directory."""
    import safetensors.torch

    from components.controlnet.model import ControlledDiT
    from components.dit.load import load_dit

    meta = load_controlnet_meta(source)
    recorded, found = meta.dit_weights_sha256, dit_weights_digest(dit_manifest)
    if recorded != found:
        raise ValueError(f"{CONTROLNET_META}: this ControlNet was trained on the DiT weights with sha256 {recorded}, "
                         f"but step {dit_manifest.step!r} holds {found}: train it again on this DiT")
    dit, dit_meta = load_dit(dit_manifest)
    model = ControlledDiT(dit, int(meta.num_blocks), float(meta.control_scale))
    name = CONTROLNET_WEIGHTS if ema else CONTROLNET_RAW_WEIGHTS
    try:
        model.load_state_dict(safetensors.torch.load(read_output(source, name)))
    except RuntimeError as e:  # missing or unexpected keys, other shapes
        raise ValueError(f"{name}: does not fit a ControlNet of {meta.num_blocks} blocks over this DiT: {e}") from e
    return model.to(device).eval(), meta, dit_meta
