"""How training draws t: uniformly, or by importance (Nichol & Dhariwal 2021, sec. 3.3).

``LossAwareSampler`` keeps, per timestep, the last ``history`` values of the L_vlb term L_t and draws
t with p_t ∝ sqrt(E[L_t²]) over them, mixed with a ``uniform_share`` of the uniform law (their code's
``LossSecondMomentResampler``: 10 terms, 0.001) so that no t starves; until every t has a full
history it draws uniformly. The estimate of L_vlb = Σ_t L_t stays unbiased when each term is
weighted by 1 / (T p_t) (``importance``): E_p[L_t / (T p_t)] · T = Σ_t L_t.

The history is plain tensors (``state`` / ``load_state``) so that it travels in a training checkpoint;
``update`` takes the terms in a fixed order, so ranks fed the same gathered terms hold the same history.
"""

from __future__ import annotations

import math

import torch

HISTORY = 10  # loss terms kept per timestep (improved-diffusion's history_per_term)
UNIFORM_SHARE = 0.001  # the uniform law's part of p_t (improved-diffusion's uniform_prob)
STATE_KEYS = ("loss_history", "loss_counts")


def uniform_timesteps(n: int, num_timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
    """t ~ U{0, …, T−1}, n of them: the default sampler (the draw the DiT's loss always made)."""
    return torch.randint(0, num_timesteps, (n,), generator=generator, device=device)


class LossAwareSampler:
    """p_t ∝ sqrt(E[L_t²]) from the last ``history`` L_t of each t, uniform until all are full."""

    def __init__(self, num_timesteps: int, history: int = HISTORY, uniform_share: float = UNIFORM_SHARE):
        if num_timesteps < 1 or history < 1 or not 0 <= uniform_share <= 1:
            raise ValueError(f"num_timesteps ({num_timesteps}) and history ({history}) must be positive, "
                             f"uniform_share ({uniform_share}) in [0, 1]")
        self.num_timesteps, self.uniform_share = num_timesteps, uniform_share
        self.history = torch.zeros(num_timesteps, history, dtype=torch.float64)  # oldest first
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)  # terms held per t (≤ history)

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts == self.history.shape[1]).all())

    def probabilities(self) -> torch.Tensor:
        """p_t (float64, sums to 1): uniform until warmed up, then the mixture of sqrt(E[L_t²])'s law and uniform."""
        uniform = torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        if not self.warmed_up:
            return uniform
        second_moment = self.history.pow(2).mean(dim=1).sqrt()
        if not torch.isfinite(second_moment).all() or second_moment.sum() <= 0:
            return uniform
        return (1 - self.uniform_share) * second_moment / second_moment.sum() + self.uniform_share * uniform

    def sample(self, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, importance): n timesteps drawn from p (with ``generator``, on its device) and each one's
        weight 1 / (T p_t), float32 on ``device``."""
        p = self.probabilities()
        t = torch.multinomial(p.to(generator.device), n, replacement=True, generator=generator).to(device)
        importance = (1.0 / (self.num_timesteps * p))[t.cpu()]
        return t, importance.to(device=device, dtype=torch.float32)

    def update(self, timesteps: torch.Tensor, terms: torch.Tensor) -> None:
        """Append each (t, L_t) in order, dropping a t's oldest term once it holds ``history``. Non-finite
        terms (a skipped step's) are left out."""
        size = self.history.shape[1]
        for t, term in zip(timesteps.detach().cpu().long().tolist(), terms.detach().cpu().double().tolist()):
            if not math.isfinite(term):
                continue
            if self.counts[t] == size:
                self.history[t, :-1] = self.history[t, 1:].clone()
                self.history[t, -1] = term
            else:
                self.history[t, self.counts[t]] = term
                self.counts[t] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {"loss_history": self.history.clone(), "loss_counts": self.counts.clone()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        history, counts = tensors["loss_history"], tensors["loss_counts"]
        if tuple(history.shape) != tuple(self.history.shape) or tuple(counts.shape) != tuple(self.counts.shape):
            raise ValueError(f"loss history of shape {tuple(history.shape)} (counts {tuple(counts.shape)}) does not "
                             f"fit {tuple(self.history.shape)}: saved with other num_timesteps or history length")
        self.history, self.counts = history.to(torch.float64).clone(), counts.to(torch.int64).clone()
