"""A DeepSpeed engine from a ``TrainConfig``: ZeRO stage, precision, clipping, accumulation, AdamW
and the LR schedule. Model code stays free of all of it.

DeepSpeed is given a torch ``AdamW`` (its fused CPU Adam is a JIT C++ build; on GPUs torch's own
fused CUDA kernel does the update, with nothing to compile) and reuses the
process group Ray Train created (gloo on CPU, NCCL on GPUs). Its LR scheduler is a ``LambdaLR``
that DeepSpeed steps at every accumulation boundary and saves in its checkpoints.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from components.common.train_types import TrainConfig


def deepspeed_config(cfg: "TrainConfig", world_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size(world_size),
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size,  # global: micro-batch x accumulation x workers
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0,  # 0: dynamic loss scaling
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed's own step prints off
        "wall_clock_breakdown": False,
    }
    return _merge(config, cfg.deepspeed)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def lr_factor(cfg: "TrainConfig", step: int) -> float:
    """Multiplier of ``cfg.lr`` for the update that makes step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(model: "nn.Module", cfg: "TrainConfig", world_size: int):
    import deepspeed
    import deepspeed.ops
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (~150 s on
        # a fresh machine) that only speeds up CPU inference collectives; gloo does ours.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        # DeepSpeed places the module on the engine's device; the fused optimizer needs it there first.
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=on_gpu)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg, world_size), dist_init_required=False)
    return engine


def compute_dtype(engine) -> "torch.dtype":
    import torch

    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def needs_own_grad_norm(engine) -> bool:
    """DeepSpeed reports the global gradient norm for ZeRO and 16-bit runs, not for fp32 stage 0."""
    return not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())


def grad_norm(engine) -> float:
    """Global norm of the (already all-reduced) gradients, before clipping."""
    import torch

    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
