"""The evaluate step's samples: the one place the step touches the generator (DiT + autoencoder)."""

from __future__ import annotations

import torch

from components.common.step import Manifest
from components.dit.config import SamplingConfig, meta_uses_classes, meta_uses_text
from components.evaluate.judge import EvaluateError


def generate_samples(inputs: dict[str, Manifest], labels: torch.Tensor, sampling: SamplingConfig,
                     batch_size: int, device: str, classes: list[str], prompts: list[str] | None = None,
                     ) -> torch.Tensor:
    """uint8 (N, C, H, W) samples of the DiT (EMA weights) decoded by the autoencoder: of ``labels``,
    or for a text-conditioned DiT of ``prompts`` (one per label: a caption of that class; a class+text DiT
    takes both, each prompt under its class). Checks that
    the DiT knows the shard's classes."""
    from components.autoencoder.load import load_autoencoder
    from components.dit.generate import generate
    from components.dit.load import load_dit

    dit, dit_meta = load_dit(inputs["dit"], device=device, ema=True)
    dit_classes = dit_meta.class_names()
    if list(dit_classes) != list(classes):
        raise EvaluateError(f"the dit step ({inputs['dit'].output_uri}) was trained on classes {dit_classes}, "
                            f"the shard step has {classes}")
    ae, ae_meta = load_autoencoder(inputs["autoencoder"], device=device)
    if dit_meta.uses_text != (prompts is not None):
        raise EvaluateError("a text-conditioned DiT samples from prompts, a class-conditional one from labels")
    return generate(dit, dit_meta, ae, ae_meta, labels if meta_uses_classes(dit_meta) else None, sampling,
                    batch_size=batch_size, progress=True, prompts=prompts)


def dit_takes_text(inputs: dict[str, Manifest]) -> bool:
    """Whether the evaluated DiT is text-conditioned (read from its manifest, not its weights; no DiT
    manifest: a stand-in generator, sampled by label)."""
    from components.dit.load import load_dit_meta

    return inputs.get("dit") is not None and load_dit_meta(inputs["dit"]).uses_text
