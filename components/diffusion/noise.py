"""Noise streams: where a sampler's random draws come from.

A stream is a callable ``noise(like)`` that returns the next draw shaped like ``like`` (on its device, in
its dtype). Every sampler takes one as ``noise=`` and draws from it in a fixed order, so the stream alone
decides the randomness. ``per_sample_noise`` gives each sample of the batch its own seeded generator:
sample i's draws then never depend on its batch-mates, and a seed fixes every image whatever the batch
size. ``batch_noise`` draws the whole batch from one generator (diffusers' convention, which the oracle
tests follow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

NoiseStream = Callable[[torch.Tensor], torch.Tensor]


def sample_generator(seed: int, index: int, *stream: int) -> torch.Generator:
    """The random stream of sample ``index`` under ``seed`` (CPU; its draws are moved to the device).
    ``stream`` separates further streams of the same sample (a cascade's stages)."""
    entropy = [seed, index, *stream]
    state = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.Generator().manual_seed(state)


def draw_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> torch.Tensor:
    """One standard normal draw of ``shape`` from each generator, stacked: (len(generators), *shape).
    Drawn on the CPU in float32, so a sample's numbers are the same on every device."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


def per_sample_noise(generators: Sequence[torch.Generator]) -> NoiseStream:
    """The stream whose row i comes from ``generators[i]`` only."""

    def draw(like: torch.Tensor) -> torch.Tensor:
        if len(like) != len(generators):
            raise ValueError(f"a batch of {len(like)} samples but {len(generators)} noise generators")
        return draw_per_sample(generators, like.shape[1:], like.device).to(like.dtype)

    return draw


def batch_noise(generator: torch.Generator | None = None) -> NoiseStream:
    """The stream that draws the whole batch at once from ``generator`` (torch's global one when None)."""

    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    return draw
