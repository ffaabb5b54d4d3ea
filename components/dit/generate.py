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

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from components.common.images import to_uint8
from components.diffusion import (
    Denoiser,
    NoiseSchedule,
    config_options,
    draw_per_sample,
    make_cfg_model_fn,
    per_sample_noise,
    run_sampler,
    sample_generator,
    spaced_timesteps,
    threshold_fn,
)
from components.dit.config import SamplingConfig
from components.dit.load import DitMeta, sampling_meta

if TYPE_CHECKING:
    from components.autoencoder.load import AutoencoderMeta


def with_classifier_guidance(model_fn, classifier, dit_meta: DitMeta, schedule: NoiseSchedule, weight: float):
    """``model_fn`` steered by the noisy classifier (model, meta), after checking it was trained on
    the DiT's forward process and classes."""
    from components.diffusion.classifier_guidance import make_classifier_guided_model_fn
    from components.noisy_classifier.load import NoisyClassifierMeta

    if classifier is None:
        raise ValueError("sample.classifier_guidance needs the noisy_classifier step's classifier (add the "
                         "noisy_classifier section to the pipeline)")
    model, meta = classifier[0], NoisyClassifierMeta.of(classifier[1])
    mine = (meta.schedule, int(meta.num_timesteps), meta.classes)
    dits = (dit_meta.schedule, int(dit_meta.num_timesteps), dit_meta.classes)
    if mine != dits:
        raise ValueError(f"the noisy classifier was trained on (schedule, timesteps, classes) {mine}, the DiT on "
                         f"{dits}: classifier guidance needs them equal")
    device = next(model.parameters()).device
    return make_classifier_guided_model_fn(model_fn, lambda x, t: model(x.to(device), t.to(device)), schedule,
                                           weight, dit_meta.prediction)


def dit_denoiser(dit: torch.nn.Module, dit_meta: "DitMeta | dict", sampling: SamplingConfig, schedule: NoiseSchedule,
                 classifier=None) -> Denoiser:
    """The DiT as the samplers see it: guided fn(x_t, t, y, **text) (classifier-free with ``sampling.guidance``,
    then classifier guidance when set) with the DiT's prediction, learned variance and ``sampling``'s
    thresholding. A text-conditioned DiT (``TextDiT``) is guided against its encoder's null caption."""
    dit_meta = sampling_meta(dit_meta)  # typed, or its JSON form
    if dit_meta.learn_sigma and sampling.fixed_variance != "beta_tilde":
        raise ValueError(f"fixed_variance {sampling.fixed_variance!r} is for a DiT with a fixed variance; this one "
                         "learned Sigma (learn_sigma) and samples with it: drop the setting")
    null_label = None if dit_meta.null_label is None else int(dit_meta.null_label)
    null_text = dit.null_text() if hasattr(dit, "null_text") else None
    guided = make_cfg_model_fn(lambda x, t, y, **text: dit(x, t, y, **text), null_label, sampling.guidance,
                               null_text=null_text)
    if sampling.classifier_guidance:
        guided = with_classifier_guidance(guided, classifier, dit_meta, schedule, sampling.classifier_guidance)
    return Denoiser(guided, prediction=dit_meta.prediction, learned_variance=bool(dit_meta.learn_sigma),
                    clip_x0=threshold_fn(sampling.thresholding, sampling.dynamic_threshold_percentile))


def conditions(dit: torch.nn.Module, labels: torch.Tensor | None, prompts: Sequence[str] | None, start: int,
               stop: int, device) -> dict:
    """The samplers' ``extra_args`` of samples [start, stop): their class labels and their prompts' encoding."""
    extra = {"y": None if labels is None else labels[start:stop].to(device)}
    if prompts is not None:
        extra |= dit.encode(list(prompts[start:stop])).extra_args()
    return extra


def checked_labels(labels, prompts, dit_meta: DitMeta) -> torch.Tensor | None:
    """The labels as int64 on the CPU, checked against the DiT's classes; None for a text-only model."""
    if dit_meta.null_label is None and prompts is not None:
        return None
    labels = (labels.detach().cpu().long().flatten() if isinstance(labels, torch.Tensor)
              else torch.as_tensor(list(labels), dtype=torch.long))
    num_classes = int(dit_meta.num_classes)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (this DiT has {num_classes} classes), "
                         f"got {sorted(set(labels.tolist()))[:10]}")
    if prompts is not None and len(prompts) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(prompts)} prompts: a class+text DiT takes one of each per image")
    return labels


def generate(dit: torch.nn.Module, dit_meta: "DitMeta | dict", ae: torch.nn.Module, ae_meta: "AutoencoderMeta | dict",
             labels: Sequence[int] | torch.Tensor | None,
             sampling: SamplingConfig, batch_size: int = 256, progress: bool = False,
             timesteps: torch.Tensor | None = None, classifier=None,
             prompts: Sequence[str] | None = None, extra: dict[str, torch.Tensor] | None = None,
             x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Images of the given class labels (and prompts, for a text-conditioned DiT): uint8 (N, C, H, W) on
    the CPU, in the order given.

    Classifier-free guidance with weight ``sampling.guidance`` against ``dit_meta.null_label`` and,
    with prompts, the empty caption (0: the conditional model alone, no unconditional pass); timesteps
    from ``spaced_timesteps``; any sampler of the registry (``sampling.sampler``, its options from
    ``sampling``'s fields of the same names); optional thresholding of x̂_0 (``threshold_fn``); latents
    decoded with the autoencoder's ``decode_scaled``. Runs on the DiT's device, under inference mode.
    ``timesteps`` (descending) replaces the spaced grid: a distilled student's own levels.
    ``classifier``: (model, meta) of the noisy_classifier step, for ``sampling.classifier_guidance``.
    ``prompts``: one per image (a text-only DiT takes ``labels=None``; a class+text DiT one label and one
    prompt per image, and guidance nulls both together: the null label with the empty caption). ``extra``: more per-image
    conditioning tensors (N, ...) for the model's keyword arguments (a ControlNet's ``control``). ``x_T``:
    the initial latents, one per image, instead of each image's seeded draw (interpolation:
    ``components.diffusion.interpolation``). The metas may be given in their JSON form (the DiT task's
    preview holds its meta so)."""
    from components.autoencoder.load import AutoencoderMeta, decode_scaled
    from components.common.progress import progress_bar

    dit_meta, ae_meta = sampling_meta(dit_meta), AutoencoderMeta.of(ae_meta)
    labels = checked_labels(labels, prompts, dit_meta)
    count = len(prompts) if labels is None else len(labels)
    if x_T is not None and tuple(x_T.shape) != (count, *(int(s) for s in dit_meta.latent_shape)):
        raise ValueError(f"x_T of shape {tuple(x_T.shape)} for {count} images of latents {dit_meta.latent_shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = tuple(int(s) for s in dit_meta.latent_shape)
    device = next(dit.parameters()).device
    schedule = NoiseSchedule.from_name(dit_meta.schedule, int(dit_meta.num_timesteps))
    if timesteps is None:
        timesteps = spaced_timesteps(schedule.num_timesteps, sampling.steps, sampling.spacing)
    denoiser = dit_denoiser(dit, dit_meta, sampling, schedule, classifier)
    options = config_options(sampling.sampler, sampling)

    modes = (dit.training, ae.training)
    dit.eval()  # train mode would drop labels (class dropout)
    ae.eval()
    bar = progress_bar(count, desc="sample", unit="img") if progress else None
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                generators = [sample_generator(sampling.seed, i) for i in range(start, stop)]
                x = draw_per_sample(generators, shape, device) if x_T is None else x_T[start:stop].to(device)
                z = run_sampler(sampling.sampler, denoiser, x, timesteps, schedule, noise=per_sample_noise(generators),
                                extra_args=conditions(dit, labels, prompts, start, stop, device)
                                | {k: v[start:stop].to(device) for k, v in (extra or {}).items()}, **options)
                chunks.append(to_uint8(decode_scaled(ae, ae_meta, z)).cpu())  # (B, C, H, W)
                if bar is not None:
                    bar.update(stop - start)
    finally:
        dit.train(modes[0])
        ae.train(modes[1])
        if bar is not None:
            bar.close()
    if not chunks:
        return torch.empty((0, int(ae_meta.channels), int(ae_meta.image_size), int(ae_meta.image_size)),
                           dtype=torch.uint8)
    return torch.cat(chunks)


def invert(dit: torch.nn.Module, dit_meta: "DitMeta | dict", ae: torch.nn.Module, ae_meta, images: torch.Tensor,
           labels: Sequence[int], sampling: SamplingConfig) -> torch.Tensor:
    """x_T of uint8 images (N, C, H, W): encoded by the autoencoder, then DDIM-inverted (``ddim_invert``) over the
    timesteps ``generate`` walks with ``sampling``, under the same labels and guidance, so that ``generate``
    with ``x_T`` and η = 0 maps each back to (close to) its image."""
    from components.autoencoder.load import AutoencoderMeta, encode_scaled
    from components.diffusion import ddim_invert

    dit_meta, ae_meta = sampling_meta(dit_meta), AutoencoderMeta.of(ae_meta)
    labels = checked_labels(labels, None, dit_meta)
    device = next(dit.parameters()).device
    schedule = NoiseSchedule.from_name(dit_meta.schedule, int(dit_meta.num_timesteps))
    timesteps = spaced_timesteps(schedule.num_timesteps, sampling.steps, sampling.spacing)
    denoiser = dit_denoiser(dit, dit_meta, sampling, schedule)
    modes = (dit.training, ae.training)
    dit.eval()
    ae.eval()
    try:
        with torch.inference_mode():
            z0 = encode_scaled(ae, ae_meta, images.to(device)).float()
            return ddim_invert(denoiser, z0, timesteps, schedule, extra_args={"y": labels.to(device)}).cpu()
    finally:
        dit.train(modes[0])
        ae.train(modes[1])
