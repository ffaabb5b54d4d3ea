"""Bits per dimension of the evaluated DiT's variational bound on validation latents (``evaluate.bpd``).

For a class-conditional DiT that learns Σ (``learn_sigma``: trained with L_hybrid or L_vlb): the first
``bpd.samples`` validation images of the shard step, encoded by the autoencoder (posterior mode times the
scale factor, as the latents step stores them), scored by ``components.diffusion.bpd.vlb_bpd`` with the EMA
weights and the true labels (the bound on log p(z | y), no guidance). ``bpd`` is the mean of prior + Σ KL
terms + decoder NLL in bits per latent dimension; ``bpd_prior``, ``bpd_kl`` and ``bpd_decoder`` are its parts.
The decoder term is the 256-level discretised Gaussian of Ho et al. (``losses.vlb_terms``, what the loss
trains): on latents it is a bound of the same form, not a likelihood of the pixels. A fixed-variance DiT
(L_simple) and a text-conditioned one get no bpd metrics.
"""

from __future__ import annotations

import logging
import time

import torch

from components.common.step import Manifest
from components.evaluate.config import BpdConfig

log = logging.getLogger(__name__)


def measures_bpd(cfg: BpdConfig, inputs: dict[str, Manifest]) -> bool:
    """Whether the evaluated DiT gets bpd: a class DiT with a learned variance, and ``bpd.enabled``."""
    from components.dit.load import load_dit_meta

    if not cfg.enabled or inputs.get("dit") is None or inputs.get("autoencoder") is None:
        return False
    meta = load_dit_meta(inputs["dit"])
    return bool(meta.learn_sigma) and not meta.uses_text


def val_images(shard: Manifest, size: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split's first ``count`` (uint8 images, labels), in shard order."""
    from components.evaluate.judge import split_batches

    images, labels, have = [], [], 0
    for batch_images, batch_labels in split_batches(shard, "val", size):
        images.append(torch.from_numpy(batch_images[: count - have]))
        labels.append(torch.from_numpy(batch_labels[: count - have]).long())
        have += len(images[-1])
        if have >= count:
            break
    if not images:
        raise ValueError(f"the shard step ({shard.output_uri}) has no validation images to measure bits/dim on")
    return torch.cat(images), torch.cat(labels)


def bpd_metrics(cfg: BpdConfig, inputs: dict[str, Manifest], size: int, device: str) -> dict[str, float]:
    """{bpd, bpd_prior, bpd_kl, bpd_decoder, bpd_samples, bpd_timesteps}; empty when ``measures_bpd`` is false."""
    from components.autoencoder.load import encode_scaled, load_autoencoder
    from components.diffusion import NoiseSchedule
    from components.diffusion.bpd import bpd_timesteps, vlb_bpd
    from components.dit.load import load_dit

    if not measures_bpd(cfg, inputs):
        return {}
    started = time.perf_counter()
    dit, meta = load_dit(inputs["dit"], device=device, ema=True)
    ae, ae_meta = load_autoencoder(inputs["autoencoder"], device=device)
    schedule = NoiseSchedule.from_name(meta.schedule, int(meta.num_timesteps))
    images, labels = val_images(inputs["shard"], size, cfg.samples)
    generator = torch.Generator().manual_seed(cfg.seed)
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for start in range(0, len(images), cfg.batch_size):
            x0 = encode_scaled(ae, ae_meta, images[start:start + cfg.batch_size].to(device)).float()
            y = labels[start:start + cfg.batch_size].clamp(min=0).to(device)
            terms = vlb_bpd(lambda x, t: dit(x, t, y[: len(x)]).float(), schedule, x0,
                            prediction=meta.prediction, timesteps=cfg.timesteps, generator=generator)
            for key, value in terms.items():
                parts.setdefault(key, []).append(value)
    means = {key: float(torch.cat(values).mean()) for key, values in parts.items()}
    log.info("evaluate: %.4f bits/dim on %d validation latents (%.1fs)", means["total"], len(images),
             time.perf_counter() - started)
    return {"bpd": means["total"], "bpd_prior": means["prior"], "bpd_kl": means["kl"],
            "bpd_decoder": means["decoder"], "bpd_samples": float(len(images)),
            "bpd_timesteps": float(len(bpd_timesteps(schedule.num_timesteps, cfg.timesteps)))}
