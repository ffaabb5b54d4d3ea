"""What the trainer trains in the DiT step (a ``TrainTask``): the DiT, its loss and export, and where
its batches come from (``LatentDitTask``: the latents step's latents; ``PixelDitTask``: the shard
images, encoded by the frozen autoencoder inside the loss).

t uniform on [0, T) or by importance (``timestep_sampler: loss_aware``: p_t from the history of the
L_vlb terms, ``components.diffusion.timestep_sampler``), noise and t from the trainer's per-(step, rank)
generator; L_simple on the configured prediction (eps / v / x0), L_hybrid or L_vlb with ``learn_sigma``
(``cfg.objective``); label dropout (``class_dropout_prob``) trains the unconditional branch that
classifier-free guidance needs.

The loss-aware history is the task's checkpointed state (``extra_state``), so a resumed run draws
the t an uninterrupted one would; every rank feeds it the terms of all ranks, gathered in rank order
(``gathered_terms``), so the history, and so p_t, is the same on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.common.step import Manifest
from components.dit.config import DitConfig
from components.dit.load import DIT_META, DIT_RAW_WEIGHTS, DIT_WEIGHTS

if TYPE_CHECKING:
    from PIL import Image

SAMPLES_SERIES = "samples"  # the grid as an MLflow image series: one per checkpoint, and the final one


class DitTask:
    """What the trainer trains: the DiT, its loss and export. The subclasses say where batches come
    from: ``{"latent", "label"}`` (used as x_0) or ``{"image", "label"}`` (encoded first)."""

    # Stored text embeddings arrive as a frozen encoder's output does on the fly: fp32, whatever the compute dtype.
    fp32_inputs = frozenset({"context", "pooled"})

    def __init__(self, cfg: DitConfig, model_kwargs: dict[str, Any], meta: dict[str, Any],
                 latents: Manifest | None = None, autoencoder: Manifest | None = None,
                 in_memory: tuple[torch.Tensor, ...] | None = None, init: tuple[str, str] | None = None,
                 tokenizer_json: str | None = None):
        self.cfg, self.model_kwargs, self.meta = cfg, dict(model_kwargs), dict(meta)
        self.tokenizer_json = tokenizer_json  # the joint text encoder's vocabulary (text conditioning)
        self.init = init  # (directory URI, weights file) of a warm start
        self.latents_manifest, self.autoencoder_manifest = latents, autoencoder
        self.in_memory = in_memory  # (latents, labels): tests and benchmarks, instead of a manifest
        self._schedule = self._data = self._ae = self._timesteps = self._null = None

    def __getstate__(self):  # what travels to workers: configs and manifests, no loaded models
        return {**self.__dict__, "_schedule": None, "_data": None, "_ae": None, "_timesteps": None, "_null": None}

    @property
    def stored_text(self) -> bool:
        """Whether batches carry the latents step's caption embeddings (a frozen encoder's; the driver's
        ``prepare_text`` refused them unless they are dit.text's encoder's): the encoder is then not loaded."""
        from components.text.stored import stored_record

        return self.cfg.uses_text and self.cfg.text.kind != "joint" and stored_record(self.latents_manifest) is not None

    @property
    def timestep_sampler(self):
        """The loss-aware sampler (its history so far), or None for uniform t."""
        from components.diffusion.timestep_sampler import LossAwareSampler

        if self._timesteps is None and self.cfg.timestep_sampler == "loss_aware":
            self._timesteps = LossAwareSampler(self.cfg.num_timesteps)
        return self._timesteps

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {} if self.timestep_sampler is None else self.timestep_sampler.state()

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.timestep_sampler is not None:
            self.timestep_sampler.load_state(tensors)

    def draw_timesteps(self, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t, importance weights 1/(T p_t) or None for uniform t)."""
        from components.diffusion.timestep_sampler import uniform_timesteps

        if self.timestep_sampler is None:
            return uniform_timesteps(n, self.cfg.num_timesteps, generator, device), None
        return self.timestep_sampler.sample(n, generator, device)

    @property
    def schedule(self):
        from components.diffusion import NoiseSchedule

        if self._schedule is None:
            self._schedule = NoiseSchedule.from_name(self.cfg.schedule, self.cfg.num_timesteps)
        return self._schedule

    def build_model(self) -> torch.nn.Module:
        from components.common.warm_start import load_into

        return load_into(self.bare_model(with_encoder=not self.stored_text), self.init)

    def bare_model(self, with_encoder: bool = True) -> torch.nn.Module:
        """The freshly initialised network: the DiT, or with text the ``TextDiT`` of it and its encoder
        (without a frozen one when ``with_encoder`` is false: training from stored embeddings)."""
        from components.dit.model import DiT

        dit = DiT(**self.model_kwargs)
        if not self.cfg.uses_text:
            return dit
        from components.dit.text_model import TextDiT
        from components.text.load import build_text_encoder
        from components.text.tokenizer import WordTokenizer

        tokenizer = WordTokenizer.from_json(self.tokenizer_json) if self.tokenizer_json else None
        if not with_encoder and self.cfg.text.kind != "joint":
            return TextDiT(dit, None)
        return TextDiT(dit, build_text_encoder(self.cfg.text, tokenizer, "dit.text"))

    def set_autoencoder(self, model: torch.nn.Module, meta: dict) -> None:
        """Use an already loaded autoencoder for ``data: pixels`` (benchmarks); else it is loaded
        from the manifest in each worker on first use."""
        self._ae = (model.eval().requires_grad_(False), meta)

    def clean_latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_0 of the batch, float32: the stored latents, or the images encoded now."""
        if "latent" in batch:
            return batch["latent"].float()
        from components.autoencoder.load import encode_scaled, load_autoencoder

        if self._ae is None:
            self.set_autoencoder(*load_autoencoder(self.autoencoder_manifest))
        model, meta = self._ae
        images = batch["image"]
        model.to(images.device)
        with torch.no_grad():
            return encode_scaled(model, meta, images.float()).float()

    def loss(self, model, batch, step, generator):
        from components.diffusion import training_losses

        x0 = self.clean_latents(batch)                                           # (N, c, h, w)
        y = batch["label"].long().clamp(min=0) if self.cfg.uses_classes else None  # unlabelled (-1): class 0 of 1
        dtype = next(v for v in batch.values() if torch.is_tensor(v) and v.is_floating_point()).dtype  # compute dtype
        n, device = x0.shape[0], x0.device
        t, importance = self.draw_timesteps(n, generator, device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        # Condition dropout for classifier-free guidance, drawn here rather than inside the model so that
        # every random choice of a step comes from the (seed, step, rank) generator: a resumed run
        # repeats the steps of an uninterrupted one exactly. A dropped caption is the empty one, the null.
        # class+text: one draw per sample drops label and caption together (the null label and the empty
        # caption), so the model learns one fully unconditional eps(x, null) and guidance extrapolates
        # from it, as Ho & Salimans' single null; apart, the "unconditional" branch would still see one of them.
        p = self.cfg.text.caption_dropout if self.cfg.uses_text else self.cfg.class_dropout_prob
        drop = (torch.rand(n, generator=generator, device=device) < p).long()
        conditioning = {}
        if self.cfg.uses_classes:
            conditioning["force_drop_ids"] = drop
        if self.cfg.uses_text:
            conditioning.update(self.text_conditioning(batch, drop))

        def model_fn(x, tt, y):  # the diffusion arithmetic stays fp32; the model runs in the compute dtype
            return model(x.to(dtype), tt, y, **conditioning).float()

        terms = training_losses(self.schedule, model_fn, x0, t, noise, prediction=self.cfg.prediction,
                                learned_variance=self.cfg.learn_sigma, vlb_weight=self.cfg.vlb_weight,
                                model_kwargs={"y": y}, objective=self.cfg.objective, importance=importance)
        if self.timestep_sampler is not None:
            self.timestep_sampler.update(*gathered_terms(t, terms["vlb"].detach()))
        extras = {"mse": float(terms["mse"].detach().mean())}
        if self.cfg.learn_sigma:
            extras["vlb"] = float(terms["vlb"].detach().mean())
        return terms["loss"].mean(), extras

    def text_conditioning(self, batch, drop: torch.Tensor) -> dict[str, Any]:
        """The text arguments of the batch, dropped rows (``drop`` 1) the null: the stored encoding and
        the stored null when the batch carries them, else the captions, encoded by the model."""
        if "context" in batch:
            from components.text.stored import read_null, with_null

            if self._null is None:
                self._null = read_null(self.latents_manifest)
            return with_null(batch["context"].float(), batch["context_mask"], batch["pooled"].float(), drop, self._null)
        from components.text.model import NULL_CAPTION

        return {"captions": [NULL_CAPTION if d else c for c, d in zip(batch["caption"], drop.tolist())]}

    def export(self, model, ema_model, out_dir: Path) -> None:
        from components.common.task_parts import export_weights

        export_weights(model, ema_model, out_dir, DIT_WEIGHTS, DIT_RAW_WEIGHTS, DIT_META, self.meta)
        if self.tokenizer_json is not None:  # the joint text encoder's vocabulary, beside its weights
            from components.text.load import TOKENIZER_FILE

            (out_dir / TOKENIZER_FILE).write_text(self.tokenizer_json, encoding="utf-8")

    def preview(self, ema) -> tuple[str, "Image.Image"] | None:
        """The step's sample grid drawn with the EMA weights so far (the trainer's checkpoint hook)."""
        from components.autoencoder.load import load_autoencoder
        from components.common.images import class_grid
        from components.dit.generate import generate

        if self.autoencoder_manifest is None and self._ae is None:
            return None
        if self._ae is None:
            self.set_autoencoder(*load_autoencoder(self.autoencoder_manifest))
        ae, ae_meta = self._ae
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a Ray GPU worker sees its own GPU as cuda:0
        dit = ema.copy_to(self.bare_model()).to(device).eval()
        labels, prompts, rows = grid_conditions(self.cfg, int(self.meta["num_classes"]), self.meta.get("grid_prompts"),
                                                self.meta.get("grid_labels"))
        images = generate(dit, self.meta, ae.to(device), ae_meta, labels, self.cfg.sample, prompts=prompts)
        return SAMPLES_SERIES, class_grid(images, rows, self.cfg.grid_per_label)


class LatentDitTask(DitTask):
    """``data: latents``: each worker streams its share of the latents step's training latents."""

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.common.task_parts import latent_source

        return latent_source(self.latents_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch,
                             captions=self.cfg.uses_text, embeddings=self.stored_text)


class PixelDitTask(DitTask):
    """``data: pixels``: each worker streams the shard images (at the base size) and encodes every
    batch with the frozen autoencoder inside the loss."""

    def __init__(self, *args, shard: Manifest | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard_manifest = shard

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.autoencoder.load import to_model_range
        from components.common.task_parts import ConvertImages, image_source

        return image_source(self.shard_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch,
                            size=int(self.meta["image_size"]), transform=ConvertImages(to_model_range))


def gathered_terms(t: torch.Tensor, terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, L_t) of every rank's micro-batch, rank 0's first (collective: every rank calls it with its own);
    as they are without a process group. Sizes are gathered first, so ranks may hold different counts."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t, terms
    local = torch.stack([t.double(), terms.double()])                          # (2, n)
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[1]], dtype=torch.int64, device=t.device))
    longest = max(int(size) for size in sizes)
    padded = torch.zeros(2, longest, dtype=torch.float64, device=t.device)
    padded[:, :local.shape[1]] = local
    every = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(every, padded)
    joined = torch.cat([part[:, :int(size)] for part, size in zip(every, sizes)], dim=1)
    return joined[0].long(), joined[1]


def grid_conditions(cfg: DitConfig, num_classes: int, prompts: list[str] | None, labels: list[int] | None = None):
    """(labels, prompts, row of each image) of a sample grid: ``grid_per_label`` images of each of
    ``grid_classes`` classes, or of each prompt for a text DiT (labels None), or of each (label, prompt)
    row for a class+text DiT (``labels``: one per prompt)."""
    per = cfg.grid_per_label
    if prompts is None:
        labels = grid_labels(num_classes, cfg.grid_classes, per)
        return labels, None, labels
    rows = [row for row in range(len(prompts)) for _ in range(per)]
    return None if labels is None else [labels[row] for row in rows], [prompts[row] for row in rows], rows


def grid_labels(num_classes: int, rows: int, per_label: int) -> list[int]:
    """``rows`` classes evenly spaced over all (all when fewer), each repeated ``per_label`` times."""
    rows = min(rows, num_classes)
    chosen = sorted({round(i * (num_classes - 1) / max(rows - 1, 1)) for i in range(rows)})
    return [label for label in chosen for _ in range(per_label)]
