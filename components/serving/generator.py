"""The generator as an MLflow ``pyfunc`` model: autoencoder + DiT (or distilled student) in one.

A logged generator's directory holds, as artifacts, a copy of each component's output files
(safetensors weights and their JSON meta) with the step's ``manifest.json``; every file is checked
against the sha256 that manifest recorded before it is read, as from the pipeline's storage.

``predict`` takes a DataFrame with one row per image:

    label     int or class name   the class to draw (a class-conditional or class+text model)
    prompt    str                 the caption to draw (a text-conditioned or class+text model; a text-only
                                  model takes no label, a class+text one both in every row)
    seed      int (default 0)     noise seed
    steps     int (optional)      denoising steps (DiT default: the step's setting; student: native)
    guidance  float (optional)    classifier-free guidance w (DiT only; a student has its own folded in)

Rows that share (seed, steps, guidance) are drawn together, in row order: the i-th of them starts
from the noise stream (seed, i), as ``latentflow sample`` draws its i-th image, so the same request
gives the same images. The answer has one row per request row: ``label`` (the index) and/or ``prompt``,
and ``image`` (PNG bytes; base64 in a served JSON answer). A frozen text encoder (CLIP, T5) travels
inside the model (``TEXT_ENCODER_DIR`` beside the DiT's files), checked against the sha256 of its files
that the DiT step recorded.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import pandas as pd  # at import: MLflow reads predict's type hints when the class is defined

from components.dit.config import meta_uses_classes, meta_uses_text

AUTOENCODER_ARTIFACT = "autoencoder"
DENOISER_ARTIFACT = "denoiser"
if TYPE_CHECKING:
    from components.autoencoder.load import AutoencoderMeta
    from components.dit.load import DitMeta

KIND_FILE = "generator.json"  # {"kind": "dit" | "distill", "sampling": defaults}, beside the denoiser's files
TEXT_ENCODER_DIR = "text_encoder"  # a frozen text encoder's directory, beside the denoiser's files


def condition_columns(meta: dict) -> list[str]:
    """A denoiser's request columns by its meta: ["label"], ["prompt"] or ["label", "prompt"] (class+text)."""
    return ["label"] * meta_uses_classes(meta) + ["prompt"] * meta_uses_text(meta)


@dataclass
class Generator:
    kind: str  # "dit" or "distill"
    denoiser: Any
    meta: "DitMeta"  # a StudentMeta for a distilled student
    ae: Any
    ae_meta: "AutoencoderMeta"
    sampling_defaults: dict | None = None  # the DiT step's sampling settings

    @property
    def takes_text(self) -> bool:
        return meta_uses_text(self.meta)

    @property
    def takes_labels(self) -> bool:
        return meta_uses_classes(self.meta)

    @property
    def columns(self) -> list[str]:
        return condition_columns(self.meta)

    @property
    def classes(self) -> list[str]:
        return self.meta.class_names()

    def images(self, labels: list[int] | None, seed: int = 0, steps: int | None = None, guidance: float | None = None,
               batch_size: int = 256, prompts: list[str] | None = None):
        """uint8 (N, C, H, W) images of ``labels`` (or ``prompts``, a text model's), sample i from noise
        stream (seed, i)."""
        import torch

        label_tensor = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.takes_text != (prompts is not None) or self.takes_labels != (labels is not None):
            raise ValueError(f"this model takes {' and '.join(self.columns)} (one of each per image), got "
                             f"{'labels' if labels is not None else 'no labels'} and "
                             f"{'prompts' if prompts is not None else 'no prompts'}")
        if self.kind == "distill":
            from components.distill.sample import generate_student

            if guidance not in (None, 0.0):
                raise ValueError("guidance does not apply to a distilled student: its teacher's is folded in")
            return generate_student(self.denoiser, self.meta, self.ae, self.ae_meta, label_tensor, steps=steps,
                                    seed=seed, batch_size=batch_size, prompts=prompts)
        from components.dit.generate import generate

        return generate(self.denoiser, self.meta, self.ae, self.ae_meta, label_tensor,
                        self.sampling(seed=seed, steps=steps, guidance=guidance), batch_size=batch_size,
                        prompts=prompts)

    def sampling(self, **overrides):
        from components.dit.config import SamplingConfig

        settings = dict(self.sampling_defaults or self.meta.sampling or {})
        settings.update({k: v for k, v in overrides.items() if v is not None})
        settings.pop("classifier_guidance", None)  # needs the workflow's noisy classifier: not in the model
        return SamplingConfig(**settings)

    def label_index(self, label: Any) -> int:
        text = str(label).strip()
        if text in self.classes:
            return self.classes.index(text)
        try:
            index = int(float(text))
        except ValueError:
            raise ValueError(f"label {label!r} is neither a class name ({', '.join(self.classes[:20])}) "
                             "nor a class index") from None
        if not 0 <= index < len(self.classes):
            raise ValueError(f"label {index} is out of range: this model has {len(self.classes)} classes")
        return index


def verified_manifest(directory: Path):
    """The manifest copied with a component's files, resolved to that directory (reads verified)."""
    from components.common.step import Manifest

    manifest = Manifest.from_json((directory / "manifest.json").read_text())
    manifest.location, manifest.root = str(directory.resolve()), ""
    return manifest


def load_generator(autoencoder_dir: str | Path, denoiser_dir: str | Path, device: str = "cpu") -> Generator:
    """A generator from the two artifact directories of a logged model."""
    from components.autoencoder.load import load_autoencoder

    denoiser_dir = Path(denoiser_dir)
    described = json.loads((denoiser_dir / KIND_FILE).read_text())
    kind = described["kind"]
    ae, ae_meta = load_autoencoder(verified_manifest(Path(autoencoder_dir)), device=device)
    manifest = verified_manifest(denoiser_dir)
    bundled = denoiser_dir / TEXT_ENCODER_DIR
    frozen_text_path = str(bundled) if bundled.is_dir() else None
    if kind == "distill":
        from components.distill.load import load_student

        denoiser, meta = load_student(manifest, device=device, frozen_text_path=frozen_text_path)
    else:
        from components.dit.load import load_dit

        denoiser, meta = load_dit(manifest, device=device, frozen_text_path=frozen_text_path)
    return Generator(kind, denoiser, meta, ae, ae_meta, described.get("sampling"))


def png(image) -> bytes:
    """PNG bytes of a uint8 (C, H, W) tensor, as ``latentflow sample`` writes its files."""
    from components.common.images import to_pil

    buffer = io.BytesIO()
    to_pil(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def prompt_of(row: dict, index: int) -> str:
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"row {index}: a text-conditioned model needs a 'prompt' string in every row, got {prompt!r}")
    return prompt


def row_settings(row: dict) -> tuple[int, int | None, float | None]:
    def present(name):
        value = row.get(name)
        return None if value is None or value != value else value  # NaN: a column absent in this row

    seed, steps, guidance = present("seed"), present("steps"), present("guidance")
    return (0 if seed is None else int(seed), None if steps is None else int(steps),
            None if guidance is None else float(guidance))


class LatentflowGenerator(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc.load_model(...).predict(DataFrame)`` -> DataFrame of (label, image PNG bytes)."""

    def load_context(self, context) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = load_generator(context.artifacts[AUTOENCODER_ARTIFACT], context.artifacts[DENOISER_ARTIFACT],
                                        device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = model_input.to_dict(orient="records")
        generator = self.generator
        if not rows:
            return pd.DataFrame({**{key: pd.Series(dtype=object if key == "prompt" else "int64")
                                    for key in generator.columns}, "image": pd.Series(dtype=object)})
        labels = [generator.label_index(row.get("label")) for row in rows] if generator.takes_labels else None
        prompts = [prompt_of(row, i) for i, row in enumerate(rows)] if generator.takes_text else None
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row_settings(row), []).append(i)
        images: list[bytes | None] = [None] * len(rows)
        for (seed, steps, guidance), members in groups.items():
            drawn = generator.images(None if labels is None else [labels[i] for i in members], seed=seed, steps=steps,
                                     guidance=guidance, prompts=None if prompts is None else [prompts[i] for i in members])
            for i, image in zip(members, drawn):
                images[i] = png(image)
        answer = {"label": labels, "prompt": prompts}
        return pd.DataFrame({**{key: answer[key] for key in generator.columns}, "image": images})
