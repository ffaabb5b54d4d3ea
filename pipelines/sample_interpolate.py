"""``latentflow sample --interpolate A,B --frames K --labels L``: a path of images between two ends, through
x_T (DDIM sec. 5.3; ``components.diffusion.interpolation``).

An end is a seed (an integer: the x_T that ``latentflow sample --seed A --labels L --per-label 1`` draws for
its image) or an image file (encoded by the workflow's autoencoder and DDIM-inverted to x_T under label L,
``components.dit.generate.invert``). The K latents of the spherical path between the two x_T are each
decoded with deterministic DDIM (η = 0, the DiT step's steps and guidance unless given), one image at a
time as ``latentflow sample`` draws them, so a seed end reproduces that command's image bit for bit.
Written: ``OUT/frame_<k>.png`` (k = 0 … K−1) and ``OUT/strip.png`` (the frames in a row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.sample import (AUTOENCODER_STEP, BadFlag, SampleError, dit_sampling_defaults, find_summary,
                              parse_labels, sampling_config, step_manifest)

if TYPE_CHECKING:
    from components.autoencoder.load import AutoencoderMeta
    from components.dit.load import DitMeta

STRIP = "strip.png"


def frame_name(k: int) -> str:
    return f"frame_{k}.png"


@dataclass
class InterpolationResult:
    out: Path
    files: list[Path]  # the frames in order, then strip.png
    ends: list[int | Path]
    label: str
    sampling: Any  # SamplingConfig
    # per image end: mean |frame − image| in 0..255 levels, how far the inversion's round trip lands from it
    round_trip: dict[str, float] = field(default_factory=dict)


def interpolation_problem(model, labels, per_label, prompted: bool, step: str, frames) -> str | None:
    """What ``--interpolate`` cannot go with, as the message that names it; None when the flags fit."""
    if model is not None:
        return "--interpolate samples a workflow's DiT: give --workflow-id, not --model"
    if prompted or per_label is not None:
        return "--interpolate takes one class with --labels, not --per-label, --prompt or --prompts"
    if step != "dit":
        return f"--interpolate goes with --step dit, not --step {step}"
    if not labels:
        return "--interpolate needs --labels with one class (the conditioning of every frame)"
    if frames is None:
        return "--interpolate needs --frames K (at least 2: the two ends)"
    return None


def parse_ends(text: str) -> list[int | Path]:
    """``A,B`` → two ends, each a seed (an integer) or an existing image file; BadFlag naming --interpolate."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise BadFlag(f"--interpolate takes two ends A,B (each a seed or an image file), got {text!r}")
    ends: list[int | Path] = []
    for part in parts:
        try:
            ends.append(int(part))
        except ValueError:
            path = Path(part)
            if not path.is_file():
                raise BadFlag(f"--interpolate: {part!r} is neither a seed (an integer) nor an image file") from None
            ends.append(path)
    return ends


def read_image(path: Path, ae_meta: "AutoencoderMeta"):
    """uint8 (1, C, H, W) of an image file, in the autoencoder's channels and size (resized, bicubic)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    size, channels = int(ae_meta.image_size), int(ae_meta.channels)
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
    except (OSError, UnidentifiedImageError) as e:
        raise BadFlag(f"--interpolate: cannot read {path} as an image ({e})") from None
    array = np.asarray(converted, dtype=np.uint8).reshape(size, size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def end_latent(end: int | Path, dit, dit_meta: "DitMeta", ae, ae_meta: "AutoencoderMeta", label: int, sampling):
    """(x_T (1, c, h, w), the image it came from or None): a seed's draw, or an image's inversion."""
    from components.diffusion import draw_per_sample, sample_generator
    from components.dit.generate import invert

    if isinstance(end, int):
        return draw_per_sample([sample_generator(end, 0)], [int(s) for s in dit_meta.latent_shape], "cpu"), None
    image = read_image(end, ae_meta)
    return invert(dit, dit_meta, ae, ae_meta, image, [label], sampling), image


def sample_interpolation(workflow_id: str, ends: str, frames: int, labels: str, out: str | os.PathLike,
                         storage: str | None = None, steps: int | None = None, guidance: float | None = None,
                         sampler: str | None = None, eta: float | None = None, device: str = "cpu",
                         progress: bool = True, search_base: str | os.PathLike = ".") -> InterpolationResult:
    """The frames between ``ends`` under class ``labels`` with the workflow's DiT, written under ``out``."""
    from components.autoencoder.load import load_autoencoder
    from components.common.images import class_grid, to_pil
    from components.diffusion.interpolation import interpolation_path
    from components.dit.generate import generate
    from components.dit.load import load_dit

    parsed = parse_ends(ends)
    if frames < 2:
        raise BadFlag(f"--frames must be at least 2 (the two ends), got {frames}")
    if (sampler not in (None, "ddim")) or (eta not in (None, 0.0)):
        raise BadFlag("--interpolate decodes with deterministic DDIM: --sampler ddim and --eta 0 only")
    summary_uri, summary = find_summary(workflow_id, storage, search_base)
    dit_manifest = step_manifest(summary, "dit", summary_uri)
    dit, dit_meta = load_dit(dit_manifest, device=device, ema=True)
    if dit_meta.uses_text:
        raise BadFlag(f"--interpolate takes a class-conditional DiT; the dit step of {workflow_id!r} is text-conditioned")
    ae, ae_meta = load_autoencoder(step_manifest(summary, AUTOENCODER_STEP, summary_uri), device=device)
    classes = dit_meta.class_names()
    label_ids = parse_labels(labels, classes)
    if len(label_ids) != 1:
        raise BadFlag(f"--interpolate takes one class in --labels, got {len(label_ids)}")
    sampling = sampling_config(dit_sampling_defaults(dit_manifest, dit_meta), sampler="ddim", eta=0.0, steps=steps,
                               guidance=guidance)
    try:
        latents, images = zip(*(end_latent(end, dit, dit_meta, ae, ae_meta, label_ids[0], sampling) for end in parsed))
        path = interpolation_path(latents[0], latents[1], frames)
        decoded = generate(dit, dit_meta, ae, ae_meta, [label_ids[0]] * frames, sampling, batch_size=1,
                           progress=progress, x_T=path)
    except ValueError as e:
        raise SampleError(str(e)) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(frames):
        files.append(out / frame_name(k))
        to_pil(decoded[k].permute(1, 2, 0).numpy()).save(files[-1], format="PNG")
    class_grid(decoded, [0] * frames, frames).save(out / STRIP, format="PNG")
    round_trip = {str(end): float((decoded[k].float() - image[0].float()).abs().mean())
                  for end, image, k in zip(parsed, images, (0, frames - 1)) if image is not None}
    return InterpolationResult(out, files + [out / STRIP], parsed, classes[label_ids[0]], sampling, round_trip)


def describe(workflow_id: str, result: InterpolationResult) -> list[str]:
    """The lines ``latentflow sample --interpolate`` prints."""
    s = result.sampling
    lines = [f"{workflow_id}: {len(result.files) - 1} frames of {result.label} from {result.ends[0]} to "
             f"{result.ends[1]} (ddim, {s.steps} steps, eta 0, guidance {s.guidance:g}; slerp in x_T)"]
    lines += [f"{end}: frame differs from the image by {gap:.2f}/255 on average (DDIM inversion's round trip)"
              for end, gap in result.round_trip.items()]
    lines.append(f"wrote {result.out}/frame_<k>.png and {result.out / STRIP}")
    return lines
