"""Class-conditional generation with a trained DiT and its autoencoder: the one sampling entry used
by the DiT step's grid, the evaluate step and ``latentflow sample``.

labels -> initial noise -> (guided) DDIM, DDPM, annealed Langevin or predictor-corrector in latent
space -> decode -> uint8 images.

Determinism: every sample has its own random stream, seeded by (sampling.seed, its index in
``labels``); its initial noise and, for the stochastic samplers (DDPM, DDIM with eta > 0, Langevin,
PC), its per-step noise come from that stream only. So a seed fixes every image whatever the batch
size, and sample i is the same image whether 10 or 10,000 are drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from PIL import Image

from components.diffusion import (
    NoiseSchedule,
    ddim_sample,
    ddim_step,
    ddpm_step,
    dynamic_threshold,
    langevin_sample,
    make_cfg_model_fn,
    pc_sample,
    spaced_timesteps,
    static_threshold,
)
from components.dit.config import SamplingConfig


def sample_generator(seed: int, index: int, *stream: int) -> torch.Generator:
    """The random stream of sample ``index`` under ``seed`` (CPU; its draws are moved to the device).
    ``stream`` separates further streams of the same sample (a cascade's stages)."""
    entropy = [seed, index, *stream]
    state = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.Generator().manual_seed(state)


def _draw(generators: list[torch.Generator], shape: Sequence[int], device) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)  # (N, c, h, w)


def threshold_fn(sampling: SamplingConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The clip_x0 of the samplers for ``sampling.thresholding``.

    Static clamps x̂_0 to [−1, 1], dynamic is Imagen's percentile rescaling: both assume data in
    [−1, 1], true of pixels but not of scaled latents (unit variance, not unit range), so in latent
    space thresholding is usually off ("none", the default)."""
    if sampling.thresholding == "static":
        return static_threshold
    if sampling.thresholding == "dynamic":
        return partial(dynamic_threshold, percentile=sampling.dynamic_threshold_percentile)
    return None


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], rounded."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def denoise(model_fn, x: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule, sampling,
            meta: dict, clip_x0, generators: list[torch.Generator], stop_at: int | None = None) -> torch.Tensor:
    """The reverse process from x at ``timesteps[0]`` to clean data, or to level ``stop_at`` (the
    truncated hand-off of a cascade). ``sampling``: sampler and its settings; ``meta``: prediction
    and learn_sigma of the model."""
    prediction, learned = meta["prediction"], bool(meta.get("learn_sigma", False))
    if sampling.sampler == "ddim" and sampling.eta == 0:  # deterministic: the library sampler as is
        return ddim_sample(model_fn, x, timesteps, schedule, prediction=prediction, learned_variance=learned,
                           clip_x0=clip_x0, stop_at=stop_at)
    if sampling.sampler in ("langevin", "pc"):  # the library samplers, fed each sample's own noise
        options = dict(noise_fn=lambda like: _draw(generators, like.shape[1:], like.device), prediction=prediction,
                       learned_variance=learned, clip_x0=clip_x0, snr=sampling.snr)
        if sampling.sampler == "pc":
            return pc_sample(model_fn, x, timesteps, schedule, corrector_steps=sampling.corrector_steps,
                             predictor=sampling.pc_predictor, stop_at=stop_at, **options)
        if stop_at is not None:
            raise ValueError("the langevin sampler ends at clean data (stop_at is not supported); use pc, ddpm or ddim")
        return langevin_sample(model_fn, x, timesteps, schedule, n_steps_each=sampling.langevin_steps,
                               step_size=sampling.langevin_step_size, **options)
    # Stochastic samplers: the same steps as ddim_sample / ddpm_sample, with each sample's noise
    # drawn from its own stream instead of one generator for the batch.
    steps = [int(t) for t in timesteps]
    shape, channels = x.shape[1:], x.shape[1]
    if sampling.sampler == "ddim":
        for t, t_prev in zip(steps, steps[1:] + [-1 if stop_at is None else stop_at]):
            out = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))[:, :channels]
            x, _ = ddim_step(schedule, out, x, t, t_prev, eta=sampling.eta, noise=_draw(generators, shape, x.device),
                             prediction=prediction, clip_x0=clip_x0)
        return x
    levels = ([] if stop_at is None else [stop_at]) + steps[::-1]  # ascending, as ddpm_sample respaces them
    chain = schedule.respace(torch.tensor(levels))
    last = 0 if stop_at is None else 1
    for i in range(len(levels) - 1, last - 1, -1):
        out = model_fn(x, torch.full((x.shape[0],), levels[i], dtype=torch.long, device=x.device))
        noise = _draw(generators, shape, x.device) if i > 0 else None
        x, _ = ddpm_step(chain, out, x, i, noise=noise, prediction=prediction, learned_variance=learned,
                         clip_x0=clip_x0)
    return x


def with_classifier_guidance(model_fn, classifier, dit_meta: dict, schedule: NoiseSchedule, weight: float):
    """``model_fn`` steered by the noisy classifier (model, meta), after checking it was trained on
    the DiT's forward process and classes."""
    from components.diffusion.classifier_guidance import make_classifier_guided_model_fn

    if classifier is None:
        raise ValueError("sample.classifier_guidance needs the noisy_classifier step's classifier (add the "
                         "noisy_classifier section to the pipeline)")
    model, meta = classifier
    mine = (meta["schedule"], int(meta["num_timesteps"]), meta.get("classes"))
    dits = (dit_meta["schedule"], int(dit_meta["num_timesteps"]), dit_meta.get("classes"))
    if mine != dits:
        raise ValueError(f"the noisy classifier was trained on (schedule, timesteps, classes) {mine}, the DiT on "
                         f"{dits}: classifier guidance needs them equal")
    device = next(model.parameters()).device
    return make_classifier_guided_model_fn(model_fn, lambda x, t: model(x.to(device), t.to(device)), schedule,
                                           weight, dit_meta["prediction"])


def generate(dit: torch.nn.Module, dit_meta: dict, ae: torch.nn.Module, ae_meta: dict,
             labels: Sequence[int] | torch.Tensor,
             sampling: SamplingConfig, batch_size: int = 256, progress: bool = False,
             timesteps: torch.Tensor | None = None, classifier=None) -> torch.Tensor:
    """Images of the given class labels: uint8 (N, C, H, W) on the CPU, in the order of ``labels``.

    Classifier-free guidance with weight ``sampling.guidance`` against ``dit_meta["null_label"]``
    (0: the conditional model alone, no unconditional pass); timesteps from ``spaced_timesteps``;
    DDIM (``eta``), DDPM, Langevin or PC; optional thresholding of x̂_0 (see ``threshold_fn``); latents decoded
    with the autoencoder's ``decode_scaled``. Runs on the DiT's device, under inference mode.
    ``timesteps`` (descending) replaces the spaced grid: a distilled student's own levels.
    ``classifier``: (model, meta) of the noisy_classifier step, for ``sampling.classifier_guidance``."""
    from components.autoencoder.load import decode_scaled
    from components.common.progress import progress_bar

    labels = (labels.detach().cpu().long().flatten() if isinstance(labels, torch.Tensor)
              else torch.as_tensor(list(labels), dtype=torch.long))
    num_classes = int(dit_meta["num_classes"])
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (this DiT has {num_classes} classes), "
                         f"got {sorted(set(labels.tolist()))[:10]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = tuple(int(s) for s in dit_meta["latent_shape"])
    device = next(dit.parameters()).device
    schedule = NoiseSchedule.from_name(dit_meta["schedule"], int(dit_meta["num_timesteps"]))
    if timesteps is None:
        timesteps = spaced_timesteps(schedule.num_timesteps, sampling.steps, sampling.spacing)
    guided = make_cfg_model_fn(lambda x, t, y: dit(x, t, y), int(dit_meta["null_label"]), sampling.guidance)
    if sampling.classifier_guidance:
        guided = with_classifier_guidance(guided, classifier, dit_meta, schedule, sampling.classifier_guidance)
    clip_x0 = threshold_fn(sampling)

    modes = (dit.training, ae.training)
    dit.eval()  # train mode would drop labels (class dropout)
    ae.eval()
    bar = progress_bar(len(labels), desc="sample", unit="img") if progress else None
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, len(labels), batch_size):
                y = labels[start:start + batch_size].to(device)
                generators = [sample_generator(sampling.seed, start + i) for i in range(len(y))]
                x = _draw(generators, shape, device)  # (B, c, h, w): x_T
                z = denoise(partial(guided, y=y), x, timesteps, schedule, sampling, dit_meta, clip_x0, generators)
                chunks.append(to_uint8(decode_scaled(ae, ae_meta, z)).cpu())  # (B, C, H, W)
                if bar is not None:
                    bar.update(len(y))
    finally:
        dit.train(modes[0])
        ae.train(modes[1])
        if bar is not None:
            bar.close()
    if not chunks:
        return torch.empty((0, int(ae_meta["channels"]), int(ae_meta["image_size"]), int(ae_meta["image_size"])),
                           dtype=torch.uint8)
    return torch.cat(chunks)


def class_grid(images: torch.Tensor, labels: Sequence[int], per_label: int) -> Image.Image:
    """A grid with one row per distinct label (in order of first appearance) and ``per_label``
    columns: the first ``per_label`` images of that label; missing cells stay black."""
    from components.common.images import image_grid

    labels = [int(label) for label in labels]
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not labels:
        raise ValueError("class_grid needs at least one image")
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    blank = np.zeros_like(arrays[0])
    cells = []
    for label in dict.fromkeys(labels):
        mine = [arrays[i] for i, other in enumerate(labels) if other == label][:per_label]
        cells += mine + [blank] * (per_label - len(mine))
    return image_grid(cells, nrow=per_label)
