"""What the shared trainer trains in the distill step: one progressive-distillation round, or a
consistency model (distilled from the DiT, or trained without a teacher).

Every task streams the latents step's training latents like the DiT does (``latent_source``; with
their captions for a text-conditioned teacher), starts its student from weights in storage (the DiT's
EMA weights, or the previous round's student), and loads a frozen teacher from storage inside each
worker. A text teacher is called with the captions' encoding and guided against its null caption; its
student is a ``TextDiT`` (``components.distill.text`` says why its joint encoder is trained with it).
Every random choice of a step comes from the trainer's (seed, step, rank) generator, so a resumed run
repeats the steps of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from components.distill.config import DistillConfig

WeightsRef = tuple[str, str]  # (directory URI, safetensors file name)


def load_weights(ref: WeightsRef) -> dict[str, torch.Tensor]:
    import safetensors.torch

    from components.common.storage import Storage

    directory, name = ref
    return safetensors.torch.load(Storage.from_uri(directory).read_bytes(name))


class DistillTask:
    """The shared part: data, student, frozen teacher, export. ``meta``: the DiT's meta (model
    arguments, schedule, prediction, null label; ``text`` for a text-conditioned DiT) plus the step's
    own facts. ``tokenizer_json``: a joint text encoder's tokenizer (the teacher's)."""

    weights_name, raw_weights_name, meta_name = "distill.safetensors", "distill_raw.safetensors", "distill.json"

    def __init__(self, cfg: DistillConfig, meta: dict[str, Any], init: WeightsRef | None,
                 teacher: WeightsRef | None, latents=None, in_memory: tuple | None = None,
                 tokenizer_json: str | None = None):
        self.cfg, self.meta, self.init, self.teacher_ref = cfg, dict(meta), init, teacher
        self.latents_manifest, self.in_memory = latents, in_memory
        self.tokenizer_json = tokenizer_json
        self._schedule = self._teacher = self._frozen_encoder = None

    def __getstate__(self):  # configs and references travel to the workers, not tensors
        return {**self.__dict__, "_schedule": None, "_teacher": None, "_frozen_encoder": None}

    @property
    def uses_text(self) -> bool:
        from components.distill.text import uses_text

        return uses_text(self.meta)

    @property
    def schedule(self):
        from components.diffusion import NoiseSchedule

        if self._schedule is None:
            self._schedule = NoiseSchedule.from_name(self.meta["schedule"], int(self.meta["num_timesteps"]))
        return self._schedule

    def new_dit(self) -> torch.nn.Module:
        """A fresh network of the teacher's kind: the DiT, or the ``TextDiT`` of it and a text encoder
        (a frozen one built once per worker and shared by teacher, student and target)."""
        from components.dit.model import DiT

        dit = DiT(**self.meta["model"])
        if not self.uses_text:
            return dit
        from components.distill.text import text_encoder
        from components.dit.text_model import TextDiT

        if self.meta["text"]["kind"] == "joint":
            return TextDiT(dit, text_encoder(self.meta, self.tokenizer_json))
        if self._frozen_encoder is None:
            self._frozen_encoder = text_encoder(self.meta, None)
        return TextDiT(dit, self._frozen_encoder)

    def build_model(self) -> torch.nn.Module:
        model = self.new_dit()
        if self.init is not None:
            model.load_state_dict(load_weights(self.init))
        return model

    def teacher(self, like: torch.Tensor, dtype: torch.dtype):
        """The frozen teacher as guided fn(z, t, y, **text) -> model output (the DiT's prediction type),
        on ``like``'s device in the compute dtype; loaded once per worker. A text teacher takes its
        captions' encoding (``teacher_text``) and is guided against its own null caption, as the
        DiT's sampling guides it."""
        from components.diffusion import make_cfg_model_fn

        if self._teacher is None:
            model = self.new_dit()
            model.load_state_dict(load_weights(self.teacher_ref))
            model = model.to(like.device, dtype).eval().requires_grad_(False)
            null_label = None if self.meta.get("null_label") is None else int(self.meta["null_label"])
            with torch.no_grad():
                null_text = model.null_text() if self.uses_text else None
            guided = make_cfg_model_fn(lambda z, t, y, **text: model(z.to(dtype), t, y, **text).float(),
                                       null_label, float(self.meta["teacher_cfg_weight"]), null_text=null_text)
            self._teacher = (guided, model)
        return self._teacher[0]

    @torch.no_grad()
    def teacher_text(self, captions: list[str] | None) -> dict[str, torch.Tensor]:
        """The teacher's encoding of the captions (context, context_mask, pooled), once per batch; {}
        for a class teacher. Call ``teacher`` first."""
        if captions is None:
            return {}
        return self._teacher[1].encode(list(captions)).extra_args()

    def batch_source(self, rank: int, world_size: int, micro_batch: int):
        from components.common.task_parts import latent_source

        return latent_source(self.latents_manifest, self.in_memory, self.cfg.train, rank, world_size, micro_batch,
                             captions=self.uses_text)

    def unpack(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype, list[str] | None]:
        """(x0 fp32, labels (None for a text-only teacher), the compute dtype, captions (None without text))."""
        from components.distill.text import labels_of

        latent = batch["latent"]
        captions = list(batch["caption"]) if self.uses_text else None
        return latent.float(), labels_of(batch, self.meta), latent.dtype, captions

    def export(self, model, ema_model, out_dir) -> None:
        from components.common.task_parts import export_weights

        export_weights(model, ema_model, out_dir, self.weights_name, self.raw_weights_name, self.meta_name, self.meta)
        if self.tokenizer_json is not None:  # the joint encoder's vocabulary (the teacher's), beside its weights
            from components.text.load import TOKENIZER_FILE

            (out_dir / TOKENIZER_FILE).write_text(self.tokenizer_json, encoding="utf-8")


class ProgressiveTask(DistillTask):
    """One round of progressive distillation (Salimans & Ho 2022, alg. 2). The teacher's DDIM grid
    is ``meta["teacher_levels"]`` (descending); the student's is every other level, and one student
    step t -> t'' learns the teacher's two steps t -> t' -> t''."""

    def loss(self, model, batch, step, generator):
        from components.diffusion import predict_x0_eps
        from components.distill.targets import truncated_snr_weight
        from components.distill.text import student_conditions

        x0, y, dtype, captions = self.unpack(batch)
        n, device = x0.shape[0], x0.device
        teacher_levels = torch.as_tensor(self.meta["teacher_levels"], dtype=torch.long)
        student_steps = len(teacher_levels) // 2
        i = torch.randint(0, student_steps, (n,), generator=generator, device=device).cpu()
        t, t_mid = teacher_levels[2 * i], teacher_levels[2 * i + 1]
        padded = torch.cat([teacher_levels, torch.tensor([-1])])  # -1: clean data
        t_end = padded[2 * i + 2]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        a_t = self.schedule.alphas_cumprod[t].to(device, torch.float32).sqrt().view(-1, 1, 1, 1)
        z_t = a_t * x0 + (1 - a_t**2).sqrt() * noise

        t, t_mid, t_end = t.to(device), t_mid.to(device), t_end.to(device)
        target = self.teacher_target(z_t, y, t, t_mid, t_end, dtype, captions)
        out = model(z_t.to(dtype), t, y, **student_conditions(y, captions)).float()[:, :x0.shape[1]]
        x0_student, _ = predict_x0_eps(self.schedule, out, z_t, t, self.meta["prediction"])
        weight = truncated_snr_weight(self.schedule, t, x0)  # max(SNR, 1), in x space
        per_example = (weight * (x0_student - target) ** 2).flatten(1).mean(1)
        return per_example.mean(), {"x_mse": float((x0_student - target).detach().pow(2).mean())}

    @torch.no_grad()
    def teacher_target(self, z_t, y, t, t_mid, t_end, dtype, captions: list[str] | None = None) -> torch.Tensor:
        """x~ for z_t: the teacher's two DDIM steps t -> t_mid -> t_end, then the x-prediction
        whose one DDIM step t -> t_end lands where they did (per example levels; -1: clean)."""
        from components.diffusion import predict_x0_eps
        from components.distill.targets import ddim_step_x0, progressive_target

        teacher, prediction = self.teacher(z_t, dtype), self.meta["prediction"]
        text = self.teacher_text(captions)
        x0_1, _ = predict_x0_eps(self.schedule, teacher(z_t, t, y, **text), z_t, t, prediction)
        z_mid = ddim_step_x0(self.schedule, z_t, x0_1, t, t_mid)
        x0_2, _ = predict_x0_eps(self.schedule, teacher(z_mid, t_mid, y, **text), z_mid, t_mid, prediction)
        z_end = ddim_step_x0(self.schedule, z_mid, x0_2, t_mid, t_end)
        return progressive_target(self.schedule, z_t, z_end, t, t_end)


class ConsistencyTask(DistillTask):
    """Consistency distillation (a Heun/Euler step of the teacher's probability-flow ODE) or, with
    no teacher, consistency training (the same noise at both levels: the unbiased score estimate).
    The target network theta- is an EMA of the student kept here, saved in every checkpoint."""

    def __init__(self, *args, autoencoder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.autoencoder_manifest = autoencoder  # decodes both sides for the lpips distance
        self._target = self._lpips = None

    def __getstate__(self):
        return {**super().__getstate__(), "_target": None, "_lpips": None}

    def distance(self, online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example distance; lpips compares the decoded images (gradients flow through the
        frozen decoder into the online side), brought to at least 32 px."""
        from components.distill.targets import distance

        kind = self.cfg.consistency.distance
        if kind != "lpips":
            return distance(online, target, kind)
        from components.autoencoder.load import load_autoencoder
        from components.autoencoder.lpips import load_lpips

        if self._lpips is None:
            ae, ae_meta = load_autoencoder(self.autoencoder_manifest)
            self._lpips = (ae.requires_grad_(False).to(online.device), ae_meta,
                           load_lpips(self.cfg.consistency.lpips_weights).to(online.device))
        ae, ae_meta, lpips = self._lpips
        # decode_scaled runs without gradients; the online side needs them
        images = [ae.decode(z / ae_meta.scale_factor).float().clamp(-1, 1) for z in (online, target)]
        if images[0].shape[-1] < 32:  # VGG's five stages halve the size four times
            images = [torch.nn.functional.interpolate(i, size=32, mode="bilinear") for i in images]
        return lpips(*images)

    @property
    def distilling(self) -> bool:
        return self.cfg.method == "consistency_distillation"

    def levels_at(self, step: int) -> torch.Tensor:
        """The discretisation in use at ``step``: fixed for CD, growing for CT."""
        from components.distill.consistency import consistency_levels, ct_num_levels

        c = self.cfg.consistency
        n = c.num_levels if self.distilling else ct_num_levels(step, self.cfg.train.max_steps,
                                                               c.ct_initial_levels, c.num_levels)
        return consistency_levels(self.schedule, n, c.rho)

    def target_decay(self, step: int) -> float:
        from components.distill.consistency import ct_target_decay

        c = self.cfg.consistency
        if self.distilling:
            return c.target_ema_decay
        return ct_target_decay(len(self.levels_at(step)), c.ct_initial_levels, c.ct_initial_ema)

    def target(self, like: torch.Tensor) -> torch.nn.Module:
        """theta-, kept in fp32 (its EMA would stall in bf16) on ``like``'s device."""
        if self._target is None:  # theta- starts as the student's initial weights
            self._target = self.build_model().requires_grad_(False)
        return self._target.to(like.device).eval()

    def loss(self, model, batch, step, generator):
        from components.distill.consistency import ConsistencyFunction
        from components.distill.targets import ode_step
        from components.distill.text import student_conditions

        x0, y, dtype, captions = self.unpack(batch)
        n, device = x0.shape[0], x0.device
        fn = ConsistencyFunction(self.schedule, self.levels_at(step))
        upper = torch.randint(1, len(fn.levels), (n,), generator=generator, device=device).cpu()
        z = torch.randn(x0.shape, generator=generator, device=device)
        view = (-1, 1, 1, 1)
        s_up = fn.sigmas[upper].to(device, torch.float32)
        s_low = fn.sigmas[upper - 1].to(device, torch.float32)
        x_up = x0 + s_up.view(view) * z
        with torch.no_grad():
            if self.distilling:  # one ODE step of the (guided) teacher from sigma_{n+1} to sigma_n
                teacher = self.teacher(x0, dtype)
                x_low = ode_step(fn.teacher_denoiser(teacher, y, **self.teacher_text(captions)), x_up, s_up, s_low,
                                 self.cfg.consistency.solver)
            else:
                x_low = x0 + s_low.view(view) * z
            # theta-'s weights stay fp32 (an EMA stalls in bf16), but its forward runs in the compute
            # dtype like the online side's: in fp32 it cost as much as the rest of the step on an H200
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                target = fn(self.target(x0), x_low, upper - 1, y, **student_conditions(y, captions))
        online = fn(model, x_up, upper, y, **student_conditions(y, captions))
        d = self.distance(online, target)
        return d.mean(), {"levels": float(len(fn.levels))}

    def after_step(self, module: torch.nn.Module, step: int) -> None:
        """theta- <- mu theta- + (1 - mu) theta, with the decay of the step just taken."""
        if self._target is None:
            return  # no loss was computed yet on this rank
        mu = self.target_decay(step - 1)
        with torch.no_grad():
            for target, online in zip(self._target.parameters(), module.parameters()):
                target.lerp_(online.detach().to(target.dtype), 1.0 - mu)

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self._target is None:
            return {}
        return {f"target.{k}": v.float() for k, v in self._target.state_dict().items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        target = self.new_dit().requires_grad_(False)
        target.load_state_dict({k.removeprefix("target."): v for k, v in tensors.items()})
        self._target = target
