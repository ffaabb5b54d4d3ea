"""What the trainer trains in the ControlNet step (a ``TrainTask``): the ControlNet branch over the
frozen DiT. Batches are the shard images, their control signal made in the stream
(``signals.ControlMaker``), both encoded by the frozen autoencoder in the loss.

The model the trainer (and so DeepSpeed, the EMA and the checkpoints) gets is a ``ControlledDiT``,
whose only parameters are the branch's: the DiT is frozen and held outside the module tree. The loss
is the DiT's own (its schedule, prediction and variance from ``dit.json``), t and noise from the
trainer's per-(step, rank) generator; label dropout trains the unconditional branch (with the
control) that classifier-free guidance needs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.common.step import Manifest
from components.controlnet.config import ControlNetConfig
from components.controlnet.load import CONTROLNET_META, CONTROLNET_RAW_WEIGHTS, CONTROLNET_WEIGHTS

if TYPE_CHECKING:
    from PIL import Image

SAMPLES_SERIES = "samples"  # the control | samples grid as an MLflow image series, one per checkpoint


class ControlNetTask:
    fp32_inputs = frozenset({"image", "control"})  # encoded by the autoencoder in fp32

    def __init__(self, cfg: ControlNetConfig, meta: dict[str, Any], dit: Manifest | None = None,
                 autoencoder: Manifest | None = None, shard: Manifest | None = None,
                 in_memory: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cfg, self.meta = cfg, dict(meta)
        self.dit_manifest, self.autoencoder_manifest, self.shard_manifest = dit, autoencoder, shard
        self.in_memory = in_memory  # (uint8 images, labels): tests, instead of the shard manifest
        self._dit = self._ae = self._schedule = None

    def __getstate__(self):  # configs and manifests travel to the workers, not models
        return {**self.__dict__, "_dit": None, "_ae": None, "_schedule": None}

    def set_models(self, dit: torch.nn.Module | None = None, ae: tuple[torch.nn.Module, dict] | None = None):
        """Use already loaded models (tests, the driver's grid); else each worker loads them on first use."""
        if dit is not None:
            self._dit = dit.float().eval().requires_grad_(False)
        if ae is not None:
            self._ae = (ae[0].eval().requires_grad_(False), ae[1])

    @property
    def schedule(self):
        from components.diffusion import NoiseSchedule

        if self._schedule is None:
            self._schedule = NoiseSchedule.from_name(self.meta["schedule"], int(self.meta["num_timesteps"]))
        return self._schedule

    @property
    def autoencoder(self) -> tuple[torch.nn.Module, dict]:
        from components.autoencoder.load import load_autoencoder

        if self._ae is None:
            self.set_models(ae=load_autoencoder(self.autoencoder_manifest))
        return self._ae

    def build_model(self) -> torch.nn.Module:
        """A ControlledDiT over its own copy of the frozen DiT (the trainer casts and moves each model)."""
        from components.controlnet.model import ControlledDiT
        from components.dit.load import load_dit

        if self._dit is None:
            self.set_models(dit=load_dit(self.dit_manifest)[0])
        return ControlledDiT(copy.deepcopy(self._dit), self.cfg.num_blocks, self.cfg.control_scale)

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.common.data import image_split
        from components.common.stream import ShardSource
        from components.common.task_parts import image_source
        from components.controlnet.signals import ControlDecoder, ControlMaker

        size, make = int(self.meta["image_size"]), ControlMaker(self.cfg)
        if self.cfg.control != "folder" or self.in_memory is not None:
            return image_source(self.shard_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch,
                                size=size, transform=make)
        decoder = ControlDecoder(self.cfg.folder, self.shard_manifest.info.get("image_format", "png"), size)
        return ShardSource(image_split(self.shard_manifest, "train"), decoder, micro_batch, self.cfg.train.seed, rank,
                           world_size, self.cfg.train.loader, make)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, fp32, through the frozen autoencoder."""
        from components.autoencoder.load import encode_scaled

        ae, ae_meta = self.autoencoder
        ae.to(images.device)
        with torch.no_grad():
            return encode_scaled(ae, ae_meta, images.float()).float()

    def loss(self, model, batch, step, generator):
        from components.diffusion import training_losses

        x0, control = self.latents(batch["image"]), self.latents(batch["control"])  # (N, c, h, w) each
        n, device = x0.shape[0], x0.device
        y = batch["label"].long().clamp(min=0)  # unlabelled (-1): class 0 of 1
        dtype = next(model.parameters()).dtype  # the compute dtype; the diffusion arithmetic stays fp32
        t = torch.randint(0, int(self.meta["num_timesteps"]), (n,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        drop = (torch.rand(n, generator=generator, device=device) < self.cfg.class_dropout_prob).long()

        def model_fn(x, tt, y):
            return model(x.to(dtype), tt, y, force_drop_ids=drop, control=control.to(dtype)).float()

        learn_sigma = bool(self.meta.get("learn_sigma", False))
        terms = training_losses(self.schedule, model_fn, x0, t, noise, prediction=self.meta["prediction"],
                                learned_variance=learn_sigma, model_kwargs={"y": y})
        return terms["loss"].mean(), {"mse": float(terms["mse"].detach().mean())}

    def export(self, model, ema_model, out_dir: Path) -> None:
        from components.common.task_parts import export_weights

        export_weights(model, ema_model, out_dir, CONTROLNET_WEIGHTS, CONTROLNET_RAW_WEIGHTS, CONTROLNET_META,
                       self.meta)

    def grid_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 control images, labels) of the grid's rows: the first validation images' controls."""
        from components.controlnet.signals import control_signal, find_control_file

        count = self.cfg.grid_controls
        if self.in_memory is not None:
            images, labels = self.in_memory[0][:count], self.in_memory[1][:count]
            keys = None
        else:
            from components.common.shard_reader import read_image_shards

            info = self.shard_manifest.info
            arrays, label_array, keys = read_image_shards(self.shard_manifest.storage(), info["val_shards"],
                                                          info.get("image_format", "png"), limit=count,
                                                          size=int(self.meta["image_size"]))
            images, labels = torch.from_numpy(arrays), torch.from_numpy(label_array)
        if self.cfg.control != "folder":
            return control_signal(images, self.cfg), labels.long().clamp(min=0)
        from components.controlnet.signals import ControlDecoder

        decoder = ControlDecoder(self.cfg.folder, size=int(self.meta["image_size"]))
        found = [(k, i) for i, k in enumerate(keys or []) if find_control_file(self.cfg.folder, k) is not None]
        if not found:
            raise ValueError(f"controlnet.folder {self.cfg.folder}: no control image for any validation sample")
        controls = torch.stack([torch.from_numpy(decoder.control_of(k, images[i].numpy())) for k, i in found])
        return controls, labels[[i for _, i in found]].long().clamp(min=0)

    def samples(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """(controls, samples) of the grid, drawn with ``model`` (a ControlledDiT) on its device."""
        from components.controlnet.sample import generate_controlled

        controls, labels = self.grid_inputs()
        per = self.cfg.grid_per_control
        ae, ae_meta = self.autoencoder
        ae.to(next(model.parameters()).device)
        images = generate_controlled(model, self.meta, ae, ae_meta, labels.repeat_interleave(per),
                                     controls.repeat_interleave(per, dim=0), self.cfg.sample, self.cfg.control_scale)
        return controls, images

    def preview(self, ema) -> tuple[str, "Image.Image"] | None:
        """The control | samples grid drawn with the EMA weights so far (the trainer's checkpoint hook)."""
        from components.controlnet.sample import control_grid

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = ema.copy_to(self.build_model()).to(device).eval()
        controls, images = self.samples(model)
        return SAMPLES_SERIES, control_grid(controls, images, self.cfg.grid_per_control)
