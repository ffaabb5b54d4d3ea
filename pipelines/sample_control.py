"""``latentflow sample --control IMAGE|DIR [--control-scale S] --labels … --per-label N``: images of a
finished workflow's ControlNet (its controlnet step over its frozen DiT), under each control image,
written as ``OUT/<control index>/<label>_<i>.png``, ``OUT/grid.png`` (a row per control image and
label: the control, then its samples) and ``OUT/controls.json`` (which file each index is).

A control image is the signal itself (an edge map for an ``edges`` ControlNet, a blurred image for
``blur``, …), of the DiT's image size and channels; any other shape is refused, naming the expected
one. Image j of label l uses noise stream l * N + j of the seed under every control image, so the
controls are all that differs between their rows, and the same seed, controls and labels give the
same images whatever the batch size. Every sampler and
classifier-free guidance work as without control (the residuals reach both guidance branches);
``--control-scale 0`` gives exactly the DiT's own samples.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.sample import (AUTOENCODER_STEP, GRID, BadFlag, SampleError, SampleResult, find_summary, parse_labels,
                              sampling_config, step_manifest)

CONTROLNET_STEP = "controlnet"
CONTROLS_JSON = "controls.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

if TYPE_CHECKING:
    from components.dit.load import DitMeta


def control_files(control: str | os.PathLike) -> list[Path]:
    """The control image, or a folder's images (sorted by name)."""
    path = Path(control)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BadFlag(f"--control {path}: the folder holds no {'/'.join(IMAGE_SUFFIXES)} images")
        return files
    if not path.is_file():
        raise BadFlag(f"--control {path}: no such file or folder")
    return [path]


def read_controls(files: list[Path], dit_meta: "DitMeta"):
    """uint8 (K, C, H, W) control images, each checked against the DiT's image shape."""
    import torch

    from components.common.data import decode_image
    from components.common.sample_reader import ShardDataError
    from components.controlnet.sample import check_control_images

    arrays = []
    for path in files:
        try:
            arrays.append(torch.from_numpy(decode_image(path.read_bytes(), str(path))))
        except ShardDataError as e:
            raise BadFlag(f"--control {path}: {e}") from None
    for path, array in zip(files, arrays):  # one at a time: images of several shapes cannot stack
        try:
            check_control_images(array[None], dit_meta, [f"--control {path}"])
        except ValueError as e:
            raise BadFlag(str(e)) from None
    return torch.stack(arrays)


def sample_controlled(workflow_id: str, labels: str, per_label: int, control: str | os.PathLike,
                      control_scale: float | None, out: str | os.PathLike, storage: str | None = None,
                      sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                      eta: float | None = None, seed: int | None = None, batch_size: int = 256, device: str = "cpu",
                      progress: bool = True, search_base: str | os.PathLike = ".",
                      sampler_options: dict[str, Any] | None = None) -> SampleResult:
    """Generate ``per_label`` images of each label under each control image with the workflow's ControlNet."""
    import torch

    from components.autoencoder.load import load_autoencoder
    from components.controlnet.load import load_controlnet
    from components.controlnet.sample import generate_controlled

    if per_label < 1:
        raise BadFlag(f"--per-label must be at least 1, got {per_label}")
    if control_scale is not None and control_scale < 0:
        raise BadFlag(f"--control-scale must be >= 0, got {control_scale}")
    summary_uri, summary = find_summary(workflow_id, storage, search_base)
    dit_manifest = step_manifest(summary, "dit", summary_uri)
    model, meta, dit_meta = load_controlnet(step_manifest(summary, CONTROLNET_STEP, summary_uri), dit_manifest,
                                            device=device)
    ae, ae_meta = load_autoencoder(step_manifest(summary, AUTOENCODER_STEP, summary_uri), device=device)
    sampling = sampling_config(meta.sampling, sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                               seed=seed, **(sampler_options or {}))
    if sampling.classifier_guidance:
        raise BadFlag("--classifier-guidance does not go with --control yet")
    files = control_files(control)
    controls = read_controls(files, dit_meta)
    classes = dit_meta.class_names()
    label_ids = parse_labels(labels, classes)
    every = len(label_ids) * per_label  # images per control
    label_tensor = torch.tensor(label_ids).repeat_interleave(per_label)
    scale = float(meta.control_scale) if control_scale is None else float(control_scale)
    try:  # one control at a time: each starts at noise stream 0 (module docstring)
        images = torch.cat([generate_controlled(model, dit_meta, ae, ae_meta, label_tensor, control.expand(every, -1, -1, -1),
                                                sampling, scale, batch_size, progress) for control in controls])
    except ValueError as e:
        raise SampleError(str(e)) from None
    written = write_controlled(Path(out), images, controls, files, label_ids, per_label,
                               {"sampling": sampling.model_dump(mode="json"), "control_scale": scale,
                                "control": meta.control, "workflow_id": workflow_id})
    return SampleResult(Path(out), written, label_ids, classes, sampling, summary_uri)


def write_controlled(out: Path, images, controls, files: list[Path], label_ids: list[int], per_label: int,
                     facts: dict) -> list[Path]:
    """OUT/<k>/<label>_<i>.png, OUT/grid.png (a row per control and label: the control, then its
    samples) and OUT/controls.json; the paths written, the PNGs first."""
    from components.common.images import image_grid, to_pil

    written, cells, index = [], [], 0
    for k, control in enumerate(controls):
        folder = out / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        for label in label_ids:
            cells.append(control.permute(1, 2, 0).numpy())
            for i in range(per_label):
                cell = images[index].permute(1, 2, 0).numpy()
                path = folder / f"{label}_{i}.png"
                to_pil(cell).save(path, format="PNG")
                written.append(path)
                cells.append(cell)
                index += 1
    image_grid(cells, nrow=per_label + 1).save(out / GRID, format="PNG")
    record = {**facts, "controls": [str(f) for f in files], "labels": label_ids, "per_label": per_label}
    (out / CONTROLS_JSON).write_text(json.dumps(record, indent=2))
    return written + [out / GRID, out / CONTROLS_JSON]
