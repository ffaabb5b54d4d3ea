"""Config of the latent DiT step."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from components.common.config import StrictModel, StepConfig, known_preset
from components.dit.presets import DIT_PRESETS
from components.common.train_types import TrainConfig
from components.text.config import TextEncoderConfig



# The settings of the score-based samplers, by the sampler that reads them
SCORE_SAMPLER_FIELDS = {"pc": ("snr", "corrector_steps", "pc_predictor"),
                        "langevin": ("snr", "langevin_steps", "langevin_step_size")}


class SamplingConfig(StrictModel):
    # ddim, ddpm: components/diffusion/samplers.py; langevin (annealed Langevin dynamics) and pc
    # (predictor-corrector): the score-based samplers of components/diffusion/score.py
    sampler: Literal["ddim", "ddpm", "langevin", "pc"] = "ddim"
    steps: int = Field(50, ge=1)
    # Which `steps` of the training timesteps to visit (Lin et al. 2023, table 2). "trailing" starts
    # at t = T-1, the level the initial pure noise matches; "leading" (the DDIM paper's) starts lower.
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    guidance: float = Field(4.0, ge=0)  # classifier-free guidance w: eps = (1+w) eps(x,y) - w eps(x,0)
    eta: float = Field(0.0, ge=0, le=1)  # DDIM only
    # Applied to the predicted x0 (Imagen). In latent space usually "none": scaled latents are not
    # confined to [-1, 1], so clipping them distorts the image instead of correcting drift.
    thresholding: Literal["none", "static", "dynamic"] = "none"
    dynamic_threshold_percentile: float = Field(0.995, gt=0, le=1)
    seed: int = 0
    # Score-based samplers. Langevin step size eps = 2(1 - beta_t)(snr |z| / |score|)^2 per sample
    # (Song et al. 2021): pc's corrector, and langevin's unless langevin_step_size is set.
    snr: float = Field(0.16, gt=0)
    corrector_steps: int = Field(1, ge=0)  # pc: Langevin steps at each level after its predictor step
    # pc: "ancestral" (DDPM's step with sigma^2 = beta, exact on coarse grids) or the paper's
    # "reverse_diffusion" (first order in beta: wants fine grids, ~100+ steps)
    pc_predictor: Literal["ancestral", "reverse_diffusion"] = "ancestral"
    langevin_steps: int = Field(5, ge=1)  # langevin: steps per noise level; steps * this + 1 model calls
    # langevin: the classic rule eps_t = this * (1 - alphabar_t) (Song & Ermon 2019) instead of snr
    langevin_step_size: float | None = Field(None, gt=0)
    # Classifier guidance (Dhariwal & Nichol 2021) with the noisy_classifier step's f(y | x_t, t):
    # eps - w sqrt(1 - abar) grad log f; alone (guidance: 0) or on top of classifier-free guidance
    classifier_guidance: float = Field(0.0, ge=0)
    # ddpm: the fixed reverse variance sigma_t^2 of a DiT that does not learn Sigma (Ho et al. 2020,
    # sec. 3.2): "beta_tilde" (the posterior's, the lower bound) or "beta" (the upper bound). A DiT
    # with learn_sigma samples with its own Sigma_theta: a setting other than beta_tilde is refused.
    fixed_variance: Literal["beta", "beta_tilde"] = "beta_tilde"
    cache_added = {"classifier_guidance": 0.0, "fixed_variance": "beta_tilde"}

    @model_validator(mode="after")
    def _fixed_variance_is_ddpms(self) -> "SamplingConfig":
        if self.fixed_variance != "beta_tilde" and self.sampler != "ddpm":
            raise ValueError(f"sample.fixed_variance: {self.fixed_variance} is the ddpm sampler's reverse variance, "
                             f"but sample.sampler is {self.sampler!r}")
        return self

    @model_serializer(mode="wrap")
    def _leave_out_unused_score_settings(self, handler: SerializerFunctionWrapHandler):
        # The JSON is part of the DiT and evaluate steps' cache keys: settings the chosen sampler
        # does not read must not move them, and a ddim/ddpm config keeps the key it had before
        # the score samplers existed (no cached step re-runs).
        data = handler(self)
        used = SCORE_SAMPLER_FIELDS.get(self.sampler, ())
        for name in {n for names in SCORE_SAMPLER_FIELDS.values() for n in names} - set(used):
            data.pop(name, None)
        for name, as_before in type(self).cache_added.items():  # likewise: keys from before these fields stay
            if data.get(name) == as_before:
                data.pop(name, None)
        return data


class DitConfig(StepConfig):
    preset: str = "DiT-Tiny/2"  # a key of DIT_PRESETS
    model: dict[str, Any] = Field(default_factory=dict)  # overrides of the preset's arguments
    schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    num_timesteps: int = Field(1000, ge=2)
    prediction: Literal["eps", "v", "x0"] = "eps"
    learn_sigma: bool = False  # learned variance, trained with L_hybrid (or L_vlb: `loss`)
    vlb_weight: float = Field(0.001, ge=0)  # lambda of L_hybrid
    # The objective (Nichol & Dhariwal 2021, sec. 3.1): "simple" (L_simple, a fixed variance), "hybrid"
    # (L_simple + lambda L_vlb, the VLB training only Sigma) or "vlb" (L_vlb alone, mean and Sigma); the
    # last two need learn_sigma. None: as before, hybrid with learn_sigma, else simple.
    loss: Literal["hybrid", "vlb", "simple"] | None = None
    # How t is drawn: "uniform", or "loss_aware" (sec. 3.3): p_t proportional to sqrt(E[L_t^2]) over the
    # last 10 L_vlb terms at each t (uniform until every t has 10), mixed with a 0.001 uniform share; the
    # VLB term is weighted by 1/(T p_t). Needs a VLB term to learn from: loss hybrid or vlb.
    timestep_sampler: Literal["uniform", "loss_aware"] = "uniform"
    class_dropout_prob: float = Field(0.1, ge=0, lt=1)  # label dropout for classifier-free guidance
    # "latents": train on the latents step's pre-extracted latents; "pixels": encode every batch
    # with the autoencoder on the fly (slower; kept to measure the difference)
    data: Literal["latents", "pixels"] = "latents"
    # initialise from a registered DiT, e.g. "models:/mnist-dit@champion" (see common/warm_start.py)
    warm_start: str | None = None
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=2000, batch_size=128, lr=3e-4,
                                                                   ema_decay=0.999))
    sample: SamplingConfig = Field(default_factory=SamplingConfig)  # the grid logged at the end
    grid_per_label: int = Field(8, ge=1)  # columns of samples.png
    # rows of samples.png: this many classes, evenly spaced over all of them (all when fewer)
    grid_classes: int = Field(10, ge=1)
    # What the denoiser is conditioned on: class labels, or captions through the text encoder tau_theta
    # (cross-attention to its tokens, its pooled embedding in adaLN-Zero; the shards need captions:
    # shard.captions), or both ("class+text": the class embedding in adaLN-Zero beside the pooled
    # caption, the caption's tokens through cross-attention; one label and one caption per image). A
    # text DiT has no class embedding: the caption names the class. With class+text the condition is
    # dropped as one (label and caption together, at text.caption_dropout).
    conditioning: Literal["class", "text", "class+text"] = "class"
    text: TextEncoderConfig | None = None  # the text encoder; its defaults when conditioning has text
    # The grid's prompts (text conditioning): one row per prompt. None: the first validation captions
    # (class+text: with their own labels; a given prompt's class is unknown, so class+text refuses this).
    grid_prompts: list[str] | None = None
    cache_added = {"conditioning": "class", "text": None, "grid_prompts": None, "loss": None,
                   "timestep_sampler": "uniform"}

    @model_validator(mode="after")
    def _objective_fits_the_variance(self) -> "DitConfig":
        objective = self.objective
        if objective in ("hybrid", "vlb") and not self.learn_sigma:
            raise ValueError(f"dit.loss: {objective} trains the variance Sigma_theta, but dit.learn_sigma is false; "
                             "set dit.learn_sigma: true, or dit.loss: simple")
        if objective == "simple" and self.learn_sigma:
            raise ValueError("dit.loss: simple leaves the learned variance untrained, but dit.learn_sigma is true; "
                             "set dit.loss: hybrid (or vlb), or dit.learn_sigma: false")
        if self.timestep_sampler == "loss_aware" and objective == "simple":
            raise ValueError("dit.timestep_sampler: loss_aware samples t by the history of the L_vlb terms, but "
                             "dit.loss is simple (no VLB term); set dit.learn_sigma: true and dit.loss: hybrid or vlb")
        if self.learn_sigma and self.sample.fixed_variance != "beta_tilde":
            raise ValueError(f"dit.sample.fixed_variance: {self.sample.fixed_variance} is a fixed variance, but "
                             "dit.learn_sigma is true: the DiT samples with its own Sigma_theta; drop the setting")
        return self

    @property
    def objective(self) -> str:
        """The loss in effect: ``loss``, or by default hybrid with a learned variance, simple without."""
        return self.loss or ("hybrid" if self.learn_sigma else "simple")

    @model_validator(mode="after")
    def _text_section_follows_conditioning(self) -> "DitConfig":
        if self.uses_text and self.text is None:
            self.text = TextEncoderConfig()
        if not self.uses_text and (self.text is not None or self.grid_prompts is not None):
            raise ValueError("dit.text and dit.grid_prompts are for text conditioning, but dit.conditioning is "
                             "'class'; set dit.conditioning: text (or class+text), or drop them")
        if self.conditioning == "class+text":
            self._check_class_and_text()
        return self

    def _check_class_and_text(self) -> None:
        if self.grid_prompts is not None:
            raise ValueError("dit.grid_prompts: a class+text DiT draws each grid row with a label and a caption, "
                             "and a given prompt's class is unknown; drop dit.grid_prompts (the grid then uses "
                             "validation captions with their own labels)")
        if "class_dropout_prob" in self.model_fields_set and self.class_dropout_prob != self.text.caption_dropout:
            raise ValueError(f"dit.class_dropout_prob: {self.class_dropout_prob} differs from dit.text.caption_dropout "
                             f"{self.text.caption_dropout}, but a class+text DiT drops label and caption together, "
                             "in one draw at dit.text.caption_dropout; set that one only")

    @property
    def uses_text(self) -> bool:
        return self.conditioning in ("text", "class+text")

    @property
    def uses_classes(self) -> bool:
        return self.conditioning in ("class", "class+text")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        return known_preset(value, DIT_PRESETS, "DiT")


def meta_uses_text(meta: dict) -> bool:
    """Whether a DiT (or a student of one), by its dit.json, takes captions: text or class+text."""
    return meta.get("text") is not None


def meta_uses_classes(meta: dict) -> bool:
    """Whether a DiT (or a student of one), by its dit.json, takes class labels: class or class+text. The
    null label says it (a text-only DiT has no class embedding, so none); a meta without one, its conditioning."""
    if "null_label" in meta:
        return meta["null_label"] is not None
    return meta.get("conditioning", "class") in ("class", "class+text")
