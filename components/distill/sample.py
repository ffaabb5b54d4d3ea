"""Sample a distilled student with its native number of steps (loading it: ``components.distill.load``).

The distill step writes ``distill.safetensors`` (the EMA student), ``distill_raw.safetensors`` and
``distill.json``: the DiT's meta (model arguments, schedule, prediction, classes, shapes) plus
``method``, ``guidance`` (the teacher's, folded into the student: it samples without guidance, one
network evaluation per step), ``native_steps`` and the levels it samples at (``levels``: the
progressive student's DDIM grid, descending; ``consistency_levels``: the consistency model's
discretisation, ascending, with ``sample_levels`` for multistep sampling).

A text-conditioned teacher's student samples ``prompts`` (one per image; ``labels`` None for a text-only
one), encoded by its own text encoder.

Determinism as for the DiT: sample i's initial noise and every later draw come from its own
stream (``sample_generator(seed, i)``), whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from components.common.images import to_uint8
from components.diffusion import Denoiser, NoiseSchedule, draw_per_sample, per_sample_noise, run_sampler, sample_generator
from components.distill.load import StudentMeta

PROGRESSIVE = "progressive"


def supported_steps(meta: "StudentMeta | dict") -> list[int]:
    """The step counts this student samples with: its native count (progressive), or 1 up to one
    more than its re-noising levels (consistency). ``meta``: typed, or its JSON form."""
    meta = StudentMeta.of(meta)
    if meta.method == PROGRESSIVE:
        return [int(meta.native_steps)]
    return list(range(1, len(meta.sample_levels) + 2))


def generate_student(student: torch.nn.Module, meta: "StudentMeta | dict", ae: torch.nn.Module, ae_meta,
                     labels: Sequence[int] | torch.Tensor | None, steps: int | None = None, seed: int = 0,
                     batch_size: int = 256, prompts: Sequence[str] | None = None) -> torch.Tensor:
    """uint8 images (N, C, H, W) of ``labels`` (or ``prompts``, one per image, for a text teacher's
    student) from a distilled student, decoded by the autoencoder (metas typed, or in their JSON form)."""
    from components.autoencoder.load import AutoencoderMeta
    from components.dit.config import SamplingConfig
    from components.dit.generate import checked_labels, generate

    meta, ae_meta = StudentMeta.of(meta), AutoencoderMeta.of(ae_meta)
    steps = int(meta.native_steps) if steps is None else int(steps)
    if steps not in supported_steps(meta):
        raise ValueError(f"this {meta.method} student samples with {supported_steps(meta)} steps, not {steps}")
    if meta.text is not None and prompts is None:
        raise ValueError("this student was distilled from a text-conditioned DiT: it samples from prompts")
    if meta.text is None and prompts is not None:
        raise ValueError("this student was distilled from a class-conditional DiT: it takes labels, not prompts")
    labels = checked_labels(labels, prompts, meta)
    if meta.method == PROGRESSIVE:
        sampling = SamplingConfig(sampler="ddim", steps=steps, guidance=0.0, eta=0.0, seed=seed)
        return generate(student, meta, ae, ae_meta, labels, sampling, batch_size=batch_size,
                        timesteps=torch.as_tensor(meta.levels, dtype=torch.long), prompts=prompts)
    return consistency_samples(student, meta, ae, ae_meta, labels, prompts, steps, seed, batch_size)


def consistency_samples(student: torch.nn.Module, meta: StudentMeta, ae: torch.nn.Module, ae_meta: "AutoencoderMeta",
                        labels: torch.Tensor | None, prompts: Sequence[str] | None, steps: int, seed: int,
                        batch_size: int) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, alg. 1) of the checked labels or prompts."""
    from components.autoencoder.load import decode_scaled
    from components.diffusion.consistency_sampler import top_level_input
    from components.distill.consistency import ConsistencyFunction
    from components.dit.generate import conditions

    count = len(prompts) if labels is None else len(labels)
    schedule = NoiseSchedule.from_name(meta.schedule, int(meta.num_timesteps))
    fn = ConsistencyFunction(schedule, torch.as_tensor(meta.consistency_levels, dtype=torch.long))
    shape, device = tuple(int(s) for s in meta.latent_shape), next(student.parameters()).device
    top = int(fn.levels[-1])
    timesteps = torch.as_tensor([top, *list(meta.sample_levels)[:steps - 1]], dtype=torch.long)
    denoiser = Denoiser(fn.x0_model(student), prediction="x0")
    chunks = []
    was_training, _ = student.training, student.eval()
    try:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            generators = [sample_generator(seed, i) for i in range(start, stop)]
            x = top_level_input(schedule, draw_per_sample(generators, shape, device), top)
            with torch.inference_mode():
                extra_args = conditions(student, labels, prompts, start, stop, device)
                z = run_sampler("consistency", denoiser, x, timesteps, schedule,
                                noise=per_sample_noise(generators), extra_args=extra_args)
                chunks.append(to_uint8(decode_scaled(ae, ae_meta, z)).cpu())
    finally:
        student.train(was_training)
    if not chunks:
        size = int(ae_meta.image_size)
        return torch.empty((0, int(ae_meta.channels), size, size), dtype=torch.uint8)
    return torch.cat(chunks)

