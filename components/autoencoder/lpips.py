"""LPIPS perceptual distance (Zhang et al. 2018), VGG-16 variant, from local safetensors weights.

Nothing is downloaded, ever. The file holds the state dict of the ``lpips`` package's
``LPIPS(net="vgg")`` (the same layout as LDM's ``taming.modules.losses.lpips.LPIPS``):
``scaling_layer.shift``/``scale``, ``net.slice{1..5}.<i>.weight``/``bias`` (torchvision VGG-16
``features`` indices) and ``lin{0..4}.model.1.weight``. Convert once on a machine that has it:

    safetensors.torch.save_model(lpips.LPIPS(net="vgg"), "lpips_vgg.safetensors")

(``save_model`` keeps one name of the heads' aliases ``lin<i>``/``lins.<i>``; either is accepted.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# VGG-16 ``features``: (index, in, out) of each conv, grouped into the five LPIPS slices; a ReLU
# follows every conv, a max-pool opens slices 2-5.
VGG_SLICES = (
    ((0, 3, 64), (2, 64, 64)),
    ((5, 64, 128), (7, 128, 128)),
    ((10, 128, 256), (12, 256, 256), (14, 256, 256)),
    ((17, 256, 512), (19, 512, 512), (21, 512, 512)),
    ((24, 512, 512), (26, 512, 512), (28, 512, 512)),
)


class _Lin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """(N, C, H, W) x2 in [-1, 1] -> (N,) distances; grayscale inputs are repeated to RGB."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.net = nn.Module()
        for number, convs in enumerate(VGG_SLICES, start=1):
            layers = nn.Sequential()
            if number > 1:
                layers.add_module(str(convs[0][0] - 1), nn.MaxPool2d(2, 2))
            for index, c_in, c_out in convs:
                layers.add_module(str(index), nn.Conv2d(c_in, c_out, 3, padding=1))
                layers.add_module(str(index + 1), nn.ReLU(inplace=False))
            setattr(self.net, f"slice{number}", layers)
        for i, convs in enumerate(VGG_SLICES):
            setattr(self, f"lin{i}", _Lin(convs[-1][2]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        shift, scale = self.scaling_layer.shift, self.scaling_layer.scale
        h_x, h_y = (x - shift) / scale, (y - shift) / scale
        total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for i in range(len(VGG_SLICES)):
            block = getattr(self.net, f"slice{i + 1}")
            h_x, h_y = block(h_x), block(h_y)  # (N, C_i, H_i, W_i)
            diff = (_unit(h_x) - _unit(h_y)).pow(2)
            total = total + getattr(self, f"lin{i}").model(diff).mean(dim=(1, 2, 3))  # (N,)
        return total


def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def check_lpips_file(path: str | None) -> None:
    """Fail early, naming the path, when LPIPS is configured but its weights are not on disk."""
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(
            f"lpips_weights: {path} does not exist (LPIPS weights are never downloaded; put a "
            "safetensors file of lpips.LPIPS(net='vgg').state_dict() there, or set lpips_weights: null)")


def load_lpips(path: str) -> LPIPS:
    """A frozen LPIPS in eval mode from a safetensors file (no pickle)."""
    from safetensors.torch import load_file

    check_lpips_file(path)
    model = LPIPS()
    # lpips' model also lists its heads under ``lins.<i>`` (a ModuleList of the same modules).
    state = {}
    for key, value in load_file(path).items():
        if key.startswith("lins."):
            key = "lin" + key.removeprefix("lins.")
        state.setdefault(key, value)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not an LPIPS-VGG state dict (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model.eval().requires_grad_(False)
