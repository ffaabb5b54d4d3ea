"""Exponential moving average of a model's weights, kept in fp32 and saved as safetensors.

The trainer keeps one on rank 0 and updates it after every optimizer step from the model's
working weights (under bf16 those are bf16; the average itself accumulates in fp32). Buffers
(e.g. norm statistics) are copied, not averaged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.updates = 0
        state = module.state_dict(keep_vars=True)
        # Tied weights appear under several keys; each key gets its own average of the same source.
        self.param_names = [k for k, v in state.items() if isinstance(v, nn.Parameter)]
        self.shadow: dict[str, torch.Tensor] = {
            name: value.detach().float().clone() if value.is_floating_point() else value.detach().clone()
            for name, value in state.items()
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights; buffers are copied."""
        state = module.state_dict(keep_vars=True)
        targets = [self.shadow[name] for name in self.param_names]
        sources = [state[name].detach().to(self.shadow[name].device, torch.float32) for name in self.param_names]
        torch._foreach_lerp_(targets, sources, 1.0 - self.decay)
        for name, value in state.items():
            if not isinstance(value, nn.Parameter):
                self.shadow[name].copy_(value.detach())
        self.updates += 1

    def copy_to(self, module: nn.Module) -> nn.Module:
        """Load the averaged weights into ``module`` (cast to its dtypes); returns it."""
        current = module.state_dict()
        module.load_state_dict({k: v.to(current[k].dtype) if k in current else v for k, v in self.shadow.items()})
        return module

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}, str(path),
                  metadata={"decay": repr(self.decay), "updates": str(self.updates)})

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(self.shadow):
                missing, extra = sorted(set(self.shadow) - names), sorted(names - set(self.shadow))
                raise ValueError(f"{path}: EMA weights do not match the model "
                                 f"(missing {missing[:5]}, unexpected {extra[:5]})")
            for name in names:
                self.shadow[name] = f.get_tensor(name).to(self.shadow[name].device)
            self.updates = int((f.metadata() or {}).get("updates", 0))
