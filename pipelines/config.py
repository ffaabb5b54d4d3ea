"""The pipeline config: one section per step plus ``storage``, ``tracking`` and ``ray``.

A step whose section is absent (or null) is not part of the pipeline; a step's section may only be
present when the sections of the steps it needs are.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from components.autoencoder.config import AutoencoderConfig
from components.common.config import RayConfig, StorageConfig, StrictModel, TrackingConfig, load_config
from components.controlnet.config import ControlNetConfig
from components.distill.config import DistillConfig
from components.dit.config import DitConfig
from components.evaluate.config import EvaluateConfig
from components.inception_reference.config import InceptionReferenceConfig, ReferenceTarget
from components.latents.config import LatentsConfig, LatentsTextEncoder
from components.noisy_classifier.config import NoisyClassifierConfig
from components.shard.config import ShardConfig
from components.superres.config import SuperResConfig
from pipelines.dag import LATENT_DIFFUSION, LEARNED, SUPERRES_STEP
from pipelines.shapes import check_models_follow_data
# evaluate metrics that compare a sample's class with the one asked for: meaningless for one class
CLASS_ACCURACY_METRICS = ("sample_accuracy", "cascade_sample_accuracy")


class RegistryConfig(StrictModel):
    """``latentflow retrain``'s model registry and promotion gate (see pipelines/registry.py)."""

    model_prefix: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")  # registered models <prefix>-<step>; None: name
    gate_metric: str = "sample_accuracy"  # an evaluate metric
    gate_mode: Literal["max", "min"] = "max"  # max for accuracies, min for distances
    margin: float = Field(0.0, ge=0)  # the new value must beat the champion's by more than this


class PipelineConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    autoencoder: AutoencoderConfig | None = None
    latents: LatentsConfig | None = None
    dit: DitConfig | None = None
    # a ControlNet over the frozen DiT (spatial control: edges, blur, low_res, a folder of control images)
    controlnet: ControlNetConfig | None = None
    distill: DistillConfig | None = None  # needs the latents step (the student trains on its latents)
    # f(y | x_t, t) on the latents, for classifier guidance (needs the latents step; trains beside the DiT)
    noisy_classifier: NoisyClassifierConfig | None = None
    evaluate: EvaluateConfig | None = None
    # the cascade's super-resolution stages, lowest first: steps superres_1, superres_2, ...
    superres: list[SuperResConfig] | None = None

    @model_validator(mode="after")
    def _needed_sections_present(self):
        self._check_needed_sections()
        self._check_cascade()
        self._check_global_batches()
        # Each of these would otherwise fail inside its step, after the steps upstream have trained.
        self._check_latent_grid()
        self._check_superres_levels()
        self._check_fp16_has_gpus()
        self._check_classes()
        self._check_text_conditioning()
        self._fill_latents_text_encoder()
        check_models_follow_data(self)
        if self.noisy_classifier and self.dit:
            mine, dits = self.noisy_classifier, self.dit
            if (mine.schedule, mine.num_timesteps) != (dits.schedule, dits.num_timesteps):
                raise ValueError(f"noisy_classifier is trained on schedule {mine.schedule!r} with {mine.num_timesteps} "
                                 f"steps, the DiT on {dits.schedule!r} with {dits.num_timesteps}: guidance needs "
                                 "the same forward process; set noisy_classifier.schedule/num_timesteps to the DiT's")
        inception = self.evaluate.inception if self.evaluate and self.evaluate.inception_enabled else None
        if inception and inception.cascade and self.superres and \
                inception.samples_per_class > self.evaluate.cascade_samples_per_class:
            raise ValueError(f"evaluate.inception.samples_per_class ({inception.samples_per_class}) is more than "
                             f"evaluate.cascade_samples_per_class ({self.evaluate.cascade_samples_per_class}); "
                             "lower it or set evaluate.inception.cascade: false")
        return self

    def _check_needed_sections(self) -> None:
        """A step's section may only be present with the sections of the steps it needs, as the DAG
        declares them (``pipelines.dag``). Every such problem is named, upstream first."""
        problems = []
        for spec in LATENT_DIFFUSION:
            section = getattr(self, spec.config_attribute) if spec.needs or spec.needs_when else None
            if section is None:
                continue
            missing = [needed for needed in spec.needed_sections(section) if getattr(self, needed) is None]
            if missing:
                problems.append(f"section '{spec.name}' needs section(s) {missing}")
        if problems:
            raise ValueError("; ".join(problems))

    def _check_cascade(self) -> None:
        """Stage k's input size is the size below it (for stage 1 the base resolution the autoencoder
        and DiT work at: ``autoencoder.image_size``, else the shard images'); the first stage's
        hand-off from the latent base is non-truncated."""
        size = self.base_size
        for k, stage in enumerate(self.superres or [], start=1):
            if stage.input_size != size:
                raise ValueError(f"superres.{k - 1}.input_size is {stage.input_size}, but the stage below gives "
                                 f"{size} px (for the first stage: autoencoder.image_size, else shard.image_size)")
            if k == 1 and stage.sample.handoff == "truncated":
                raise ValueError("superres.0.sample.handoff: truncated needs a pixel-space stage below; the base "
                                 "DiT samples in latent space, so the first stage takes non_truncated")
            if k > 1 and stage.sample.handoff == "truncated":
                below = self.superres[k - 2]
                if (below.schedule, below.num_timesteps) != (stage.schedule, stage.num_timesteps):
                    raise ValueError(f"superres.{k - 1}.sample.handoff: truncated needs the stage below on the "
                                     "same schedule and num_timesteps")
            size = stage.output_size

    def _learned_sections(self) -> list[tuple[str, Any]]:
        """(dotted key, section) of every step the DAG declares as trained through the trainer, in
        the DAG's order (``superres.0`` for a fan-out's entries)."""
        sections = []
        for spec in LATENT_DIFFUSION:
            section = getattr(self, spec.config_attribute) if spec.role == LEARNED else None
            if section is not None:
                sections += spec.section_keys(section)
        return sections

    def _check_global_batches(self) -> None:
        """Every learned step's global batch must split into equal micro-batches over its workers
        (every step that does not is named)."""
        problems = []
        for name, section in self._learned_sections():
            try:
                section.train.micro_batch_size(section.resources.num_workers)
            except ValueError as e:
                problems.append(f"{name}: {e} ({name}.resources.num_workers)")
        if problems:
            raise ValueError("; ".join(problems))

    def _check_latent_grid(self) -> None:
        """The autoencoder's factor f = 2**(levels - 1) must divide the base size, and the DiT's patch
        the latent grid, base / f (the models' constructors refuse both)."""
        if self.autoencoder is None:
            return
        from components.autoencoder.presets import AUTOENCODER_PRESETS
        from components.dit.presets import DIT_PRESETS

        ae, size = self.autoencoder, self.base_size
        size_key = "autoencoder.image_size" if ae.image_size else "shard.image_size"
        mult_key = "autoencoder.model.channel_mult" if "channel_mult" in ae.model else "autoencoder.preset"
        levels = len_or_none({**AUTOENCODER_PRESETS[ae.preset], **ae.model}.get("channel_mult"))
        if levels is None:  # not a list: the step names it when it builds the model
            return
        f = 2 ** (levels - 1)
        if size % f:
            raise ValueError(f"{size_key}: {size} px is not divisible by the autoencoder's downsampling factor "
                             f"f={f} ({levels} levels, from {mult_key}); use a multiple of {f}")
        if self.dit is None:
            return
        grid = size // f
        patch = {**DIT_PRESETS[self.dit.preset], **self.dit.model}.get("patch_size")
        patch_key = "dit.model.patch_size" if "patch_size" in self.dit.model else "dit.preset"
        if isinstance(patch, int) and patch > 0 and grid % patch:
            raise ValueError(f"{patch_key}: the DiT's patch size {patch} does not divide the latent grid "
                             f"{grid}x{grid} ({size_key} {size} / f={f}); pick a patch size that divides {grid}")

    def _check_superres_levels(self) -> None:
        """A stage's U-Net halves its output size at each level but the last (its constructor refuses
        a size that does not divide)."""
        if not self.superres:
            return
        from components.superres.presets import SUPERRES_PRESETS

        for k, stage in enumerate(self.superres):
            mults_key = f"superres.{k}." + ("model.channel_mults" if "channel_mults" in stage.model else "preset")
            levels = len_or_none({**SUPERRES_PRESETS[stage.preset], **stage.model}.get("channel_mults"))
            if levels is not None and stage.output_size % 2 ** (levels - 1):
                raise ValueError(f"superres.{k}.output_size: {stage.output_size} px is not divisible by "
                                 f"2^{levels - 1}, the down-sampling of the stage's {levels}-level U-Net "
                                 f"(from {mults_key})")

    def _check_text_conditioning(self) -> None:
        """Text needs captions in the shards (a text or class+text DiT, a text SR stage). The steps that sample
        a text DiT by class label (classifier guidance, ControlNet) do not take prompts yet, and the evaluated
        cascade passes the DiT's prompts on only to SR stages that take text: refused here, not mid-run.
        The distill step distills a text DiT from its captions; a class+text one is not distilled yet (its
        student and grids would need a label beside every caption)."""
        texts = [k for k, stage in enumerate(self.superres or []) if stage.text is not None]
        if texts and self.shard.captions == "none":
            raise ValueError(f"superres.{texts[0]}.text needs captions in the shards: set shard.captions "
                             "(sidecar, a captions file, or attributes for builtin:mnist)")
        if self.dit is None or not self.dit.uses_text:
            return
        mode = self.dit.conditioning
        if self.shard.captions == "none":
            raise ValueError(f"dit.conditioning: {mode} needs captions in the shards: set shard.captions (sidecar, "
                             "a captions file, or attributes for builtin:mnist)")
        by_label = [name for name in ("noisy_classifier", "controlnet") if getattr(self, name) is not None]
        if by_label:
            raise ValueError(f"dit.conditioning: {mode}: {', '.join(by_label)} sample(s) the DiT by class label and "
                             "take no prompts yet; drop those sections or use dit.conditioning: class")
        if mode == "class+text" and self.distill is not None:
            raise ValueError("dit.conditioning: class+text: the distill section distills text-only or class DiTs "
                             "(not yet one taking a label and a caption per image); drop distill or use "
                             "dit.conditioning: text")
        textless = [k for k, stage in enumerate(self.superres or []) if stage.text is None]
        if textless and self.evaluate is not None:
            raise ValueError(f"dit.conditioning: {mode}: the evaluate step's cascade passes the DiT's prompts on to "
                             f"every super-resolution stage, but superres.{textless[0]} takes no text; set "
                             f"superres.{textless[0]}.text (e.g. {{kind: joint}}) on every stage, or drop the "
                             "superres or evaluate section")

    def _fill_latents_text_encoder(self) -> None:
        """``dit.text.precompute``: the latents step stores the DiT's frozen encoder's caption embeddings, so
        ``latents.text_encoder`` is the DiT's (kind, path, max_tokens); one set by hand must be that one."""
        text = self.dit.text if self.dit is not None and self.dit.uses_text else None
        if text is None or not text.precompute:
            return
        if self.latents is None:
            raise ValueError("dit.text.precompute stores the caption embeddings beside the latents: add the latents "
                             "section (and dit.data: latents)")
        wanted = LatentsTextEncoder(kind=text.kind, path=text.path, max_tokens=text.max_tokens)
        given = self.latents.text_encoder
        if given is not None and given != wanted:
            raise ValueError(f"latents.text_encoder {given.model_dump()} is not dit.text's frozen encoder "
                             f"{wanted.model_dump()} (dit.text.precompute fills it): drop latents.text_encoder")
        self.latents.text_encoder = wanted

    def _check_fp16_has_gpus(self) -> None:
        """DeepSpeed refuses fp16 on CPU ('fp16 is not supported'); the trainer says so only once the
        step has started."""
        problems = [f"{name}.train.precision: fp16 needs GPUs, but {name}.resources.gpus_per_worker is 0 "
                    "(DeepSpeed refuses fp16 on CPU); use bf16 or fp32, or give its workers GPUs"
                    for name, section in self._learned_sections()
                    if section.train.precision == "fp16" and section.resources.gpus_per_worker == 0]
        if problems:
            raise ValueError("; ".join(problems))

    def _check_classes(self) -> None:
        """The evaluate step needs labels, a class-accuracy gate two classes or more (with one, every
        sample is "right"), and so does the noisy classifier. Counted only where that is cheap
        (builtin, a local folder); S3 and webdataset sources are left to the steps: listing a
        bucket or reading tars at plan time is neither cheap nor always possible from here."""
        if self.evaluate is None and self.noisy_classifier is None:
            return
        from components.shard.source_probe import planned_class_count

        count = planned_class_count(self.shard.source)
        if count is None:
            return
        found = (f"shard.source {self.shard.source!r} is a flat folder (unlabelled: no class sub-folders)"
                 if count == 0 else f"shard.source {self.shard.source!r} has {count} class sub-folder(s)")
        if self.evaluate is not None and count == 0:
            raise ValueError(f"evaluate: needs a labelled data set (it trains a classifier of the classes), but "
                             f"{found}; sort the images into class sub-folders or remove the evaluate section")
        gate = self.registry.gate_metric
        if self.evaluate is not None and count == 1 and gate.startswith(CLASS_ACCURACY_METRICS):
            raise ValueError(f"registry.gate_metric: {gate!r} compares classes, but {found}: every sample would "
                             "score 1.0; gate on a distance (e.g. frechet_distance with registry.gate_mode: min)")
        if self.noisy_classifier is not None and count < 2:
            raise ValueError(f"noisy_classifier: needs 2 or more classes, but {found}")

    @property
    def base_size(self) -> int:
        """The resolution the autoencoder, DiT and evaluate work at."""
        return (self.autoencoder.image_size if self.autoencoder else None) or self.shard.image_size

    @property
    def inception_reference(self) -> InceptionReferenceConfig | None:
        """The real images' Inception features, a step derived from ``evaluate.inception``: one
        target per resolution the evaluate step scores (the base, and the cascade's final size)."""
        if self.evaluate is None or not self.evaluate.inception_enabled:
            return None
        inception = self.evaluate.inception
        targets = [ReferenceTarget(name="base", size=self.base_size)]
        if inception.cascade and self.superres:
            last = self.superres[-1]
            targets.append(ReferenceTarget(name="cascade", size=last.output_size, filter=last.filter))
        settings = inception.model_dump(exclude={"cascade", "enabled"})
        return InceptionReferenceConfig(resources=self.evaluate.resources, targets=targets, **settings)

    @property
    def superres_steps(self) -> list[str]:
        return [SUPERRES_STEP.format(k) for k in range(1, len(self.superres or []) + 1)]

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"latentflow-{self.name}"

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def len_or_none(value: Any) -> int | None:
    """The number of levels of a ``channel_mult(s)`` list; None when it is no non-empty list (the
    step's model constructor then names the problem)."""
    return len(value) if isinstance(value, (list, tuple)) and value else None


def load_pipeline_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
