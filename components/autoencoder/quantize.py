"""Vector quantisation with an EMA codebook: VQ-VAE (van den Oord et al. 2017, Eq. 3 and App. A.1),
the codebook update of VQ-VAE-2 / Sonnet's ``VectorQuantizerEMA`` with Laplace-smoothed cluster
sizes, and re-seeding of dead codes from encoder outputs (Jukebox, Dhariwal et al. 2020, Sec. 3.2).

The codebook is not learned by gradients: it lives in buffers (``codebook``, ``cluster_size``,
``embed_sum``), so it is saved with the module's state dict (DeepSpeed checkpoints, the trainer's
EMA file, the exported safetensors) and never reaches the optimizer. The buffers stay float32
whatever the module is cast to (bf16 training would otherwise round the running averages).

Per training forward, with N_i the EMA cluster size, m_i the EMA sum and n_i / s_i the batch's
count / sum of vectors assigned to code i (all-reduced over data-parallel workers first):

    N_i <- γ N_i + (1 - γ) n_i            m_i <- γ m_i + (1 - γ) s_i
    e_i  = m_i / Ñ_i,   Ñ_i = (N_i + ε) / (Σ_j N_j + K ε) · Σ_j N_j      (Laplace smoothing)

then every code with N_i < ``dead_code_threshold`` is replaced by an encoder output of the batch
(rank 0's, broadcast), with N_i = threshold and m_i = threshold · e_i. Nothing is updated in eval
mode, nor from a batch holding a non-finite value on any worker (the trainer skips that step too).
The loss is only the commitment term β·||z - sg(e)||² (mean over elements); the output passes the
gradient straight through to z.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CodeStats:
    indices: torch.Tensor  # (N, H, W) int64: the code of each position
    counts: torch.Tensor  # (K,) float32: positions per code (over all workers in training)
    usage: torch.Tensor  # () fraction of codes with a count > 0
    perplexity: torch.Tensor  # () exp(H(p)) of the assignment distribution p = counts / sum


def code_statistics(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used, perplexity exp(-Σ p log p)) of per-code assignment counts (K,)."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1.0)
    return (counts > 0).float().mean(), torch.exp(-torch.special.xlogy(p, p).sum())


def _distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, ema_decay: float = 0.99,
                 dead_code_threshold: float = 1.0, epsilon: float = 1e-5):
        super().__init__()
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"VQ ema_decay must be in (0, 1), got {ema_decay}")
        self.codebook_size, self.dim = codebook_size, dim
        self.beta, self.ema_decay = beta, ema_decay
        self.dead_code_threshold, self.epsilon = dead_code_threshold, epsilon
        codebook = torch.randn(codebook_size, dim)  # Sonnet's initialiser; dead codes are soon re-seeded
        self.register_buffer("codebook", codebook)
        # N_i = 1 and m_i = e_i: a consistent state (e = m / N) before any data is seen
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():  # follow device moves, never dtype casts
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self

    @torch.no_grad()
    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) of each row of ``flat`` (M, D): (M,)."""
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                     + self.codebook.pow(2).sum(1))  # (M, K)
        return distances.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` (N, H, W) as a (N, D, H, W) tensor."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, CodeStats]:
        """(straight-through quantised z (N, D, H, W), β·commitment loss, code statistics)."""
        n, d, h, w = z.shape
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, d)  # (NHW, D)
        indices = self.assign(flat)  # (NHW,)
        quantized = F.embedding(indices, self.codebook).view(n, h, w, d).permute(0, 3, 1, 2)  # (N, D, H, W)
        counts = torch.bincount(indices, minlength=self.codebook_size).float()  # (K,)
        if self.training:  # after the lookup: this batch is quantised with the codebook it was assigned by
            counts = self._ema_update(flat, indices, counts, generator)
        loss = self.beta * F.mse_loss(z.float(), quantized)
        quantized = z + (quantized.to(z.dtype) - z).detach()  # value of the code, gradient of z
        usage, perplexity = code_statistics(counts)
        return quantized, loss, CodeStats(indices.view(n, h, w), counts, usage, perplexity)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
        """Update the buffers from this batch (every worker's); returns the all-reduced counts."""
        sums = torch.zeros(self.codebook_size, self.dim, device=flat.device).index_add_(0, indices, flat)  # (K, D)
        packed = torch.cat([counts[:, None], sums], 1)  # (K, 1 + D): one collective for both
        world = _distributed_world()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(packed)
        if not bool(torch.isfinite(packed).all()):  # the same verdict on every worker: all skip
            return packed[:, 0]
        counts, sums = packed[:, 0], packed[:, 1:]
        self.cluster_size.lerp_(counts, 1.0 - self.ema_decay)
        self.embed_sum.lerp_(sums, 1.0 - self.ema_decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self._reseed_dead_codes(flat, generator, world)
        return counts

    @torch.no_grad()
    def _reseed_dead_codes(self, flat: torch.Tensor, generator: torch.Generator | None, world: int) -> None:
        dead = self.cluster_size < self.dead_code_threshold  # identical on every worker
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        if len(flat) >= num_dead:  # distinct encoder outputs when the batch has enough
            pick = torch.randperm(len(flat), generator=generator, device=flat.device)[:num_dead]
        else:
            pick = torch.randint(len(flat), (num_dead,), generator=generator, device=flat.device)
        replacement = flat[pick].contiguous()  # (num_dead, D)
        if world > 1:
            import torch.distributed as dist

            dist.broadcast(replacement, src=0)
        self.codebook[dead] = replacement
        self.cluster_size[dead] = self.dead_code_threshold
        self.embed_sum[dead] = replacement * self.dead_code_threshold
