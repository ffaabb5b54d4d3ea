"""A text-conditioned DiT: the DiT and its text encoder tau_theta as one module (LDM's text-to-image model).

``TextDiT(dit, encoder)`` is what the trainer trains and what sampling loads. Its forward takes the
DiT's arguments and either ``captions`` (a list of str, encoded now: training, where a jointly
trained encoder needs the gradient) or the encoding itself (``context``, ``context_mask``,
``pooled``: sampling, which encodes the prompts once and lets guidance double them and swap in the
null for the unconditional half).

A jointly trained encoder is a submodule: its weights are in the state dict, the EMA and the
optimizer with the DiT's. A frozen pretrained encoder (CLIP, T5) is held outside the module tree on
purpose: it is never trained, so it is not in the state dict (its weights stay in the user's local
directory, not copied into every checkpoint and export), not in the EMA, not in the optimizer. Trained
from the latents step's stored embeddings, the frozen encoder is not even loaded (``encoder=None``): the
batches carry the encoding, and only sampling, which encodes prompts, needs the encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from components.text.frozen import FrozenTextEncoder
from components.text.model import TextEncoding


class TextDiT(nn.Module):
    def __init__(self, dit: nn.Module, encoder: nn.Module | None):
        super().__init__()
        self.dit = dit
        if encoder is None or isinstance(encoder, FrozenTextEncoder):
            # a list: not registered, so not in state_dict, EMA or optimizer
            self._frozen = [] if encoder is None else [encoder]
            self.text_encoder = None
        else:
            self._frozen, self.text_encoder = [], encoder

    @property
    def encoder(self) -> nn.Module:
        encoder = self._frozen[0] if self._frozen else self.text_encoder
        if encoder is None:
            raise RuntimeError("this TextDiT was built without its frozen text encoder (it trains from the latents "
                               "step's stored embeddings): give context, context_mask and pooled, not captions")
        return encoder

    @property
    def null_class_id(self):
        return self.dit.null_class_id

    @property
    def arguments(self):
        return self.dit.arguments

    def encode(self, captions: list[str]) -> TextEncoding:
        """The captions' encoding on the DiT's device (a frozen encoder may sit elsewhere)."""
        device = next(self.dit.parameters()).device
        encoding = self.encoder(captions)
        return TextEncoding(*(part.to(device) for part in encoding))

    def null_text(self) -> dict[str, torch.Tensor]:
        """The null condition (the empty caption's encoding, one row), as guidance's ``null_text``."""
        return self.encode([""]).extra_args()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None, captions: list[str] | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        if captions is not None:
            if context is not None:
                raise ValueError("give captions or their encoding (context, context_mask, pooled), not both")
            context, context_mask, pooled = self.encode(captions)
        return self.dit(x, t, y, force_drop_ids=force_drop_ids, context=context, context_mask=context_mask,
                        pooled=pooled)


def text_dit_arguments(encoder: nn.Module) -> dict[str, int]:
    """The DiT arguments that size its text entries to ``encoder``."""
    return {"context_dim": int(encoder.context_dim), "pooled_dim": int(encoder.pooled_dim)}
