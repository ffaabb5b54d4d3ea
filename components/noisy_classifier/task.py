"""What the trainer trains in the noisy_classifier step (a ``TrainTask``): f(y | x_t, t) with
x_t = q(x_t | x_0) at t uniform on [0, T) on the DiT's schedule, cross-entropy on the label; each
worker streams its share of the training latents, like the DiT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from components.common.step import Manifest
from components.noisy_classifier.config import NoisyClassifierConfig
from components.noisy_classifier.load import META, RAW_WEIGHTS, WEIGHTS


class NoisyClassifierTask:
    """What the trainer trains; each worker streams its share of the training latents, like the DiT."""

    def __init__(self, cfg: NoisyClassifierConfig, meta: dict[str, Any], latents: Manifest | None = None,
                 in_memory: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cfg, self.meta, self.latents_manifest, self.in_memory = cfg, dict(meta), latents, in_memory
        self._schedule = None

    def __getstate__(self):
        return {**self.__dict__, "_schedule": None}

    @property
    def schedule(self):
        from components.diffusion import NoiseSchedule

        if self._schedule is None:
            self._schedule = NoiseSchedule.from_name(self.cfg.schedule, self.cfg.num_timesteps)
        return self._schedule

    def build_model(self) -> torch.nn.Module:
        from components.noisy_classifier.model import NoisyClassifier

        return NoisyClassifier(**self.meta["model"])

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.common.task_parts import latent_source

        return latent_source(self.latents_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch)

    def loss(self, model, batch, step, generator):
        from components.diffusion import q_sample

        x0, y = batch["latent"], batch["label"].long().clamp(min=0)
        dtype = x0.dtype  # the compute dtype; the forward process in fp32
        t = torch.randint(0, self.cfg.num_timesteps, (len(x0),), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t = q_sample(self.schedule, x0.float(), t, noise)
        logits = model(x_t.to(dtype), t).float()
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss, {"accuracy": float((logits.argmax(1) == y).float().mean())}

    def export(self, model, ema_model, out_dir: Path) -> None:
        from components.common.task_parts import export_weights

        export_weights(model, ema_model, out_dir, WEIGHTS, RAW_WEIGHTS, META, self.meta)
