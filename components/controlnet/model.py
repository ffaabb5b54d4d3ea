"""ControlNet for the DiT (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"), in PixArt-delta's transformer form (Chen et al. 2024): the DiT is frozen; a trainable copy
of its first N blocks takes the noisy tokens plus a zero-initialised patch embedding of the control
latent; the output of copy block i goes through a zero-initialised linear layer and is added,
times ``control_scale``, to the output of frozen block i. At initialisation every addition is an
exact zero, so the controlled model computes the frozen DiT's output bit for bit.

The frozen DiT is held outside the module tree (as ``TextDiT`` holds a frozen text encoder): it is
not in ``state_dict``, the EMA, the optimizer or the checkpoints, only the ControlNet branch is.
``_apply`` still moves and casts it with the module (``.to(device)``, ``.bfloat16()``), and each forward
moves it to the branch's device and dtype where they differ (DeepSpeed's ZeRO casts the parameters
it optimizes one by one, which no module hook sees).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from components.dit.model import DiT, context_attention_mask


class ControlNet(nn.Module):
    """The trainable branch: the control latent's patch embedding, copies of the first ``num_blocks``
    DiT blocks (their trained weights as the start) and one zero linear per copy."""

    def __init__(self, dit: DiT, num_blocks: int):
        super().__init__()
        if not 1 <= num_blocks <= dit.depth:
            raise ValueError(f"controlnet.num_blocks is {num_blocks}; the DiT has {dit.depth} blocks (1..{dit.depth})")
        d, c, p = dit.hidden_size, dit.in_channels, dit.patch_size
        self.control_embed = nn.Linear(c * p * p, d)  # a stride-p patch conv on the control latent, as a matmul
        self.blocks = nn.ModuleList(copy.deepcopy(dit.blocks[i]) for i in range(num_blocks))
        self.zero_linears = nn.ModuleList(nn.Linear(d, d) for _ in range(num_blocks))
        for layer in (self.control_embed, *self.zero_linears):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.requires_grad_(True)


class ControlledDiT(nn.Module):
    """forward(x, t, y, control=, control_scale=, ...) -> the DiT's output with the control residuals."""

    def __init__(self, dit: DiT, num_blocks: int, control_scale: float = 1.0):
        super().__init__()
        if not isinstance(dit, DiT):
            raise ValueError(f"ControlNet takes a class-conditional DiT; got {type(dit).__name__} (a text DiT's "
                             "ControlNet is not supported yet: train the DiT with dit.conditioning: class)")
        self._frozen = [dit.eval().requires_grad_(False)]  # a list: not registered (module docstring)
        self.controlnet = ControlNet(dit, num_blocks)
        self.control_scale = control_scale

    @property
    def dit(self) -> DiT:
        return self._frozen[0]

    @property
    def null_class_id(self):
        return self.dit.null_class_id

    def _apply(self, fn, *args, **kwargs):
        self.dit._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.dit.eval()  # frozen: its label dropout never draws (the task drops labels itself)
        return self

    def follow_branch(self) -> None:
        """The frozen DiT on the branch's device, in its dtype (the compute dtype under DeepSpeed)."""
        mine, its = next(self.controlnet.parameters()), next(self.dit.parameters())
        if (mine.dtype, mine.device) != (its.dtype, its.device):
            self.dit.to(device=mine.device, dtype=mine.dtype)

    def embed_control(self, control: torch.Tensor) -> torch.Tensor:
        """Scaled control latent (N, c, h, w) -> (N, T, D) tokens, patched as the DiT patches x."""
        dit = self.dit
        if control.shape[1:] != (dit.in_channels, dit.input_size, dit.input_size):
            raise ValueError(f"the control latent has shape {tuple(control.shape[1:])}; this DiT takes "
                             f"{(dit.in_channels, dit.input_size, dit.input_size)} (the control image through "
                             "the autoencoder, as the input)")
        n, c, p, g = control.shape[0], dit.in_channels, dit.patch_size, dit.grid_size
        patches = control.view(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        return self.controlnet.control_embed(patches)  # (N, T, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None, control: torch.Tensor | None = None,
                control_scale: float | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The DiT's forward (components/dit/model.py), its first N block outputs plus
        ``control_scale`` x zero_linear_i(copy block i's output). No control, or scale 0: the DiT's own."""
        self.follow_branch()
        dit = self.dit
        scale = self.control_scale if control_scale is None else float(control_scale)
        if control is None or scale == 0:
            return dit(x, t, y, force_drop_ids, context, context_mask, pooled)
        dit.check_conditioning(y, context, pooled)
        x = dit.patchify(x) + dit.pos_embed.to(x.dtype)  # (N, T, D)
        c = dit.t_embedder(t)  # (N, D)
        if dit.y_embedder is not None:
            c = c + dit.y_embedder(y, force_drop_ids)
        if dit.pooled_embedder is not None:
            c = c + dit.pooled_embedder(pooled)
        c = F.silu(c)  # (N, D)
        attn_mask = None if context is None else context_attention_mask(context, context_mask)
        context = None if context is None else context.to(x.dtype)
        block_args = dict(c_is_activated=True, context=context, context_attn_mask=attn_mask)
        h = x + self.embed_control(control.to(x.dtype))  # (N, T, D): the copy's input
        branch = self.controlnet
        for i, block in enumerate(dit.blocks):
            if i < len(branch.blocks):
                h = branch.blocks[i](h, c, **block_args)  # (N, T, D)
            x = block(x, c, **block_args)  # (N, T, D)
            if i < len(branch.blocks):
                x = x + scale * branch.zero_linears[i](h)  # exactly +0 at initialisation
        return dit.unpatchify(dit.final_layer(x, c))  # (N, C_out, H, W)
