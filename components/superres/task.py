"""What the trainer trains in a super-resolution step (a ``TrainTask``): the U-Net and its loss on
(high, low) pairs made from the shard images in the stream.

For every batch, x = resize(image, output_size) and z = resize(x, input_size) (``filter``), z is
blurred and/or noise-augmented (``augmentation``, per example, levels given to the model), and the
U-Net learns v (or eps: ``prediction``) for x_t given z, with the mean squared error on the
stage's own noise schedule. A text stage (``text``) streams the shards' captions with the images and
encodes them in the loss (``TextSuperRes``), a fraction ``text.caption_dropout`` replaced by the empty
caption, the null of guidance.
"""

from __future__ import annotations

from typing import Any

import torch

from components.common.step import Manifest
from components.superres.config import SuperResConfig
from components.superres.load import SR_META, SR_RAW_WEIGHTS, SR_WEIGHTS


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def training_pair(images: torch.Tensor, cfg: SuperResConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(high-res target, low-res input), float in [-1, 1], from uint8 or float images."""
    from components.common.resample import resize

    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    high = resize(x, cfg.output_size, cfg.filter)
    return high, resize(high, cfg.input_size, cfg.filter)


class PairMaker:
    """The stream's batch transform: uint8 shard images -> the (high, low) training pair, float32.
    The conditioning augmentation stays in the loss: its noise comes from the (seed, step, rank)
    generator, like every random choice of a step, so a resumed run repeats it exactly."""

    def __init__(self, cfg: SuperResConfig):
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        high, low = training_pair(batch["image"], self.cfg)
        pair = {"high": high, "low": low, "label": batch["label"]}
        if "caption" in batch:  # a text stage's captions (a list of str)
            pair["caption"] = batch["caption"]
        return pair


class SuperResTask:
    """What the trainer trains: model, loss, export; (high, low) pairs streamed from the shard images."""

    fp32_inputs = frozenset({"high", "low"})  # targets and conditioning stay fp32 under bf16

    def __init__(self, cfg: SuperResConfig, model_kwargs: dict[str, Any], meta: dict[str, Any],
                 shard: Manifest | None = None, in_memory: tuple[torch.Tensor, torch.Tensor] | None = None,
                 init: tuple[str, str] | None = None, tokenizer_json: str | None = None):
        self.cfg, self.model_kwargs, self.meta = cfg, dict(model_kwargs), dict(meta)
        self.tokenizer_json = tokenizer_json  # a joint text encoder's vocabulary (text stages)
        self.init = init  # (directory URI, weights file) of a warm start
        self.shard_manifest, self.in_memory = shard, in_memory  # in_memory: (uint8 images, labels[, captions])
        self._schedule = None

    def __getstate__(self):  # configs and manifests travel to the workers, not models
        return {**self.__dict__, "_schedule": None}

    @property
    def schedule(self):  # built in each worker, not pickled
        from components.diffusion import NoiseSchedule

        self._schedule = self._schedule or NoiseSchedule.from_name(self.cfg.schedule, self.cfg.num_timesteps)
        return self._schedule

    def build_model(self) -> torch.nn.Module:
        from components.common.warm_start import load_into
        from components.superres.model import EfficientUNet

        unet = EfficientUNet(**self.model_kwargs)
        if self.cfg.text is None:
            return load_into(unet, self.init)
        from components.superres.text_model import TextSuperRes
        from components.text.load import build_text_encoder
        from components.text.tokenizer import WordTokenizer

        tokenizer = WordTokenizer.from_json(self.tokenizer_json) if self.tokenizer_json else None
        return load_into(TextSuperRes(unet, build_text_encoder(self.cfg.text, tokenizer, "superres.text")), self.init)

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.common.task_parts import image_source

        if self.cfg.text is not None:
            return captioned_source(self.shard_manifest, self.in_memory, self.cfg, rank, world_size, micro_batch)
        return image_source(self.shard_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch,
                            transform=PairMaker(self.cfg))

    def loss(self, model, batch, step, generator):
        from components.diffusion import training_losses
        from components.superres.augment import training_conditioning

        high, low = batch["high"], batch["low"]  # fp32 (fp32_inputs), made in the stream by PairMaker
        cond, levels = training_conditioning(low, self.schedule, self.cfg.augmentation, generator)
        n, device = high.shape[0], high.device
        t = torch.randint(0, self.cfg.num_timesteps, (n,), generator=generator, device=device)
        noise = torch.randn(high.shape, generator=generator, device=device)
        y = None
        if self.cfg.class_conditional:
            y = batch["label"].long().clamp(min=0)
            drop = torch.rand(n, generator=generator, device=device) < self.cfg.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, int(self.meta["num_classes"])), y)
        text = {}
        if self.cfg.text is not None:  # a dropped caption is the empty one: guidance's null
            from components.text.model import NULL_CAPTION

            drop = torch.rand(n, generator=generator, device=device) < self.cfg.text.caption_dropout
            text["captions"] = [NULL_CAPTION if d else c for c, d in zip(batch["caption"], drop.tolist())]
        dtype = next(model.parameters()).dtype  # the compute dtype; the diffusion arithmetic stays fp32

        def model_fn(x_t, tt):
            return model(x_t.to(dtype), tt, cond.to(dtype), levels, y, **text).float()

        terms = training_losses(self.schedule, model_fn, high, t, noise, prediction=self.cfg.prediction)
        return terms["loss"].mean(), {"mse": float(terms["mse"].detach().mean()),
                                      "aug_level_mean": float(levels.float().mean())}

    def export(self, model, ema_model, out_dir) -> None:
        from components.common.task_parts import export_weights

        export_weights(model, ema_model, out_dir, SR_WEIGHTS, SR_RAW_WEIGHTS, SR_META, self.meta)
        if self.tokenizer_json is not None:  # the joint text encoder's vocabulary, beside its weights
            from components.text.load import TOKENIZER_FILE

            (out_dir / TOKENIZER_FILE).write_text(self.tokenizer_json, encoding="utf-8")


def captioned_source(shard: Manifest | None, in_memory: tuple | None, cfg: SuperResConfig, rank: int,
                     world_size: int, micro_batch: int):
    """A text stage's batches: the shard step's training images with their captions (``"caption"``, a
    list of str), made into (high, low) pairs; or ``in_memory`` (uint8 images, labels, captions)."""
    from components.common.data import ImageDecoder, image_split
    from components.common.stream import ShardSource, TensorSource

    train = cfg.train
    if in_memory is not None:
        if len(in_memory) != 3:
            raise ValueError("a text super-resolution stage needs captions: in_memory is (images, labels, captions)")
        columns = dict(zip(("image", "label", "caption"), in_memory))
        return TensorSource(columns, micro_batch, train.seed, rank, world_size, train.loader.shuffle_window,
                            PairMaker(cfg))
    decoder = ImageDecoder(shard.info.get("image_format", "png"), captions=True)
    return ShardSource(image_split(shard, "train", captions=True), decoder, micro_batch, train.seed, rank, world_size,
                       train.loader, PairMaker(cfg))
