"""The evaluate step's control fidelity, with a controlnet step among its inputs: the controls of the
first ``control_samples`` validation images (made as the step made them in training), one sample of
each image's class under its control and one without (the DiT's own: control scale 0, the same seed),
both judged.

- ``control_digit_accuracy`` / ``uncontrolled_digit_accuracy``: the judge finds the requested class;
- ``edges``: ``control_edge_f1`` (the F1 between the control's edge map and the edge map of the sample
  made from it, an edge pixel matching within one pixel) beside ``uncontrolled_edge_f1`` (the same
  measure for the uncontrolled sample of the same class: what chance agreement gives);
- ``blur`` / ``low_res`` / ``folder``: ``control_signal_mae`` (the mean absolute difference, in [0, 1],
  between the control and the same signal made from the sample; for a folder, the sample itself)
  beside ``uncontrolled_signal_mae``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from components.common.step import Manifest

if TYPE_CHECKING:
    from components.controlnet.load import ControlNetMeta

CONTROL_GRID = "eval_control.png"  # a row per control: the control, the controlled sample, the uncontrolled one


def edge_f1(reference: torch.Tensor, found: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """Per-image F1 of two uint8 edge maps (N, C, H, W), 255 on edges: a pixel of one counts as matched
    when the other has an edge within ``tolerance`` pixels. Two empty maps agree (1)."""
    a, b = reference[:, :1].float() > 127, found[:, :1].float() > 127  # (N, 1, H, W)
    size = 2 * tolerance + 1

    def near(x):
        return F.max_pool2d(x.float(), size, stride=1, padding=tolerance) > 0

    precision_hits, recall_hits = (b & near(a)).sum((1, 2, 3)).float(), (a & near(b)).sum((1, 2, 3)).float()
    found_count, reference_count = b.sum((1, 2, 3)).float(), a.sum((1, 2, 3)).float()
    precision = precision_hits / found_count.clamp(min=1)
    recall = recall_hits / reference_count.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return torch.where((found_count == 0) & (reference_count == 0), torch.ones_like(f1), f1)


def validation_controls(shard: Manifest, cn_cfg, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 controls, labels) of the first ``count`` validation images (with a control, for a folder)."""
    from components.common.shard_reader import read_image_shards
    from components.controlnet.signals import ControlDecoder, control_signal, find_control_file

    info = shard.info
    arrays, labels, keys = read_image_shards(shard.storage(), info["val_shards"], info.get("image_format", "png"),
                                             limit=None if cn_cfg.control == "folder" else count, size=size)
    images, labels = torch.from_numpy(arrays), torch.from_numpy(labels).long().clamp(min=0)
    if cn_cfg.control != "folder":
        return control_signal(images, cn_cfg), labels
    decoder = ControlDecoder(cn_cfg.folder, size=size)
    chosen = [i for i, key in enumerate(keys) if find_control_file(cn_cfg.folder, key) is not None][:count]
    return torch.stack([torch.from_numpy(decoder.control_of(keys[i], arrays[i])) for i in chosen]), labels[chosen]


def signal_config(meta: "ControlNetMeta"):
    """The ControlNetConfig the step trained with, as far as its signal goes (from controlnet.json)."""
    from components.controlnet.config import ControlNetConfig

    settings = {k: getattr(meta, k) for k in ("edge_threshold", "blur_sigma", "low_res_size", "folder")
                if getattr(meta, k) is not None}
    return ControlNetConfig(control=meta.control, **settings)


def control_fidelity(cfg, inputs: dict[str, Manifest], judge_model, device: str):
    """(metrics, the evaluation.json record, the grid) of the module docstring."""
    from components.autoencoder.load import load_autoencoder
    from components.common.images import image_grid
    from components.controlnet.load import load_controlnet
    from components.controlnet.sample import generate_controlled
    from components.controlnet.signals import control_signal, edge_map
    from components.evaluate.judge import classify

    model, meta, dit_meta = load_controlnet(inputs["controlnet"], inputs["dit"], device=device)
    ae, ae_meta = load_autoencoder(inputs["autoencoder"], device=device)
    cn_cfg = signal_config(meta)
    controls, labels = validation_controls(inputs["shard"], cn_cfg, cfg.control_samples, int(dit_meta.image_size))
    scale = float(meta.control_scale)
    drawn = {name: generate_controlled(model, dit_meta, ae, ae_meta, labels, controls, cfg.sample, s, cfg.batch_size)
             for name, s in (("control", scale), ("uncontrolled", 0.0))}
    metrics = {}
    for name, images in drawn.items():
        metrics[f"{name}_digit_accuracy"] = float((classify(judge_model, images)[0].argmax(1) == labels.numpy()).mean())
        if cn_cfg.control == "edges":
            metrics[f"{name}_edge_f1"] = float(edge_f1(controls, edge_map(images, cn_cfg.edge_threshold)).mean())
        else:
            remade = images if cn_cfg.control == "folder" else control_signal(images, cn_cfg)
            metrics[f"{name}_signal_mae"] = float((remade.float() - controls.float()).abs().mean() / 255)
    record = {"control": meta.control, "control_scale": scale, "count": len(labels), "metrics": dict(metrics)}
    rows = min(10, len(labels))
    cells = [image[i].permute(1, 2, 0).numpy() for i in range(rows)
             for image in (controls, drawn["control"], drawn["uncontrolled"])]
    return metrics, record, image_grid(cells, nrow=3)
