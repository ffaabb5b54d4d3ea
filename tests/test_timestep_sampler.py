"""Loss-aware sampling of t (Nichol & Dhariwal 2021, sec. 3.3; components/diffusion/timestep_sampler.py):
frequencies against a known loss table, the history's window and its save/load, the importance weights,
the objectives (dit.loss) and their refusals, and the DiT trained with it by the real trainer, resumed."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from components.diffusion import NoiseSchedule, training_losses
from components.diffusion.timestep_sampler import HISTORY, UNIFORM_SHARE, LossAwareSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def filled(table: list[list[float]]) -> LossAwareSampler:
    """A sampler whose history holds ``table[t]`` (HISTORY terms each), fed in one pass."""
    sampler = LossAwareSampler(len(table))
    for column in range(HISTORY):
        sampler.update(torch.arange(len(table)), torch.tensor([row[column] for row in table]))
    return sampler


def test_frequencies_follow_the_root_mean_square_of_the_history():
    # t's history alternates ±a_t ... in magnitude: E[L_t²] = a_t² + b_t², so p_t ∝ sqrt(a_t² + b_t²)
    a, b = [1.0, 2.0, 0.5, 4.0, 0.0, 3.0], [0.0, 1.0, 0.5, 3.0, 0.1, 4.0]
    sampler = filled([[a[t] if i % 2 else b[t] for i in range(HISTORY)] for t in range(len(a))])
    rms = torch.tensor([((x * x + y * y) / 2) ** 0.5 for x, y in zip(a, b)], dtype=torch.float64)
    expected = (1 - UNIFORM_SHARE) * rms / rms.sum() + UNIFORM_SHARE / len(a)
    torch.testing.assert_close(sampler.probabilities(), expected)
    n = 200_000
    t, importance = sampler.sample(n, torch.Generator().manual_seed(0), "cpu")
    counts = torch.bincount(t, minlength=len(a)).double()
    assert chisquare(counts.numpy(), (n * expected).numpy()).pvalue > 1e-3
    # a wrong law (uniform) is rejected by the same test on the same draws
    assert chisquare(counts.numpy(), [n / len(a)] * len(a)).pvalue < 1e-12
    torch.testing.assert_close(importance, (1 / (len(a) * expected.float()))[t])
    assert abs(float((importance * 1.0).mean()) - 1.0) < 0.05  # E_p[1/(T p_t)] = 1


def test_uniform_until_every_history_is_full_and_the_window_keeps_the_last_terms():
    sampler = LossAwareSampler(3)
    sampler.update(torch.tensor([0, 0, 1]), torch.tensor([5.0, float("nan"), 1.0]))
    assert sampler.counts.tolist() == [1, 1, 0] and not sampler.warmed_up  # the NaN was left out
    assert torch.equal(sampler.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    t, importance = sampler.sample(1000, torch.Generator().manual_seed(1), "cpu")
    assert set(t.tolist()) == {0, 1, 2} and torch.equal(importance, torch.ones(1000))
    for value in range(HISTORY + 3):
        sampler.update(torch.tensor([0, 1, 2]), torch.tensor([float(value)] * 3))
    assert sampler.warmed_up and sampler.history[2].tolist() == [float(v) for v in range(3, HISTORY + 3)]


def test_the_history_survives_save_and_load():
    sampler = filled([[float(t + i) for i in range(HISTORY)] for t in range(5)])
    sampler.update(torch.tensor([3]), torch.tensor([7.5]))
    again = LossAwareSampler(5)
    again.load_state({k: v.clone() for k, v in sampler.state().items()})
    assert torch.equal(again.history, sampler.history) and torch.equal(again.counts, sampler.counts)
    draw = [s.sample(64, torch.Generator().manual_seed(3), "cpu") for s in (sampler, again)]
    assert torch.equal(draw[0][0], draw[1][0])
    with pytest.raises(ValueError, match="num_timesteps"):
        LossAwareSampler(6).load_state(sampler.state())


def test_objectives_and_the_importance_weights():
    s = NoiseSchedule.from_name("linear", 50)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([0, 10, 30, 49])
    weight = torch.nn.Parameter(torch.tensor(0.2))

    def model(x, tt):  # ε half and variance half, both depending on one parameter
        return torch.cat([weight * x, torch.tanh(weight) * torch.ones_like(x)], dim=1)

    hybrid = training_losses(s, model, x0, t, noise, learned_variance=True)
    vlb = training_losses(s, model, x0, t, noise, learned_variance=True, objective="vlb")
    torch.testing.assert_close(hybrid["vlb"], vlb["vlb"])
    torch.testing.assert_close(vlb["loss"], 50 * vlb["vlb"])
    torch.testing.assert_close(hybrid["loss"], hybrid["mse"] + 0.001 * 50 * hybrid["vlb"])
    importance = torch.tensor([0.5, 1.0, 2.0, 4.0])
    weighted = training_losses(s, model, x0, t, noise, learned_variance=True, objective="vlb", importance=importance)
    torch.testing.assert_close(weighted["loss"], 50 * vlb["vlb"] * importance)
    simple = training_losses(s, model, x0, t, noise)
    assert torch.equal(simple["vlb"], torch.zeros(4)) and torch.equal(simple["loss"], simple["mse"])
    with pytest.raises(ValueError, match="learned_variance"):
        training_losses(s, model, x0, t, noise, objective="vlb")


def test_the_config_refuses_what_cannot_train_naming_both_fields():
    from components.dit.config import DitConfig

    assert DitConfig().objective == "simple" and DitConfig(learn_sigma=True).objective == "hybrid"
    assert DitConfig(learn_sigma=True, loss="vlb", timestep_sampler="loss_aware").objective == "vlb"
    for bad, names in (({"loss": "vlb"}, ("dit.loss", "dit.learn_sigma")),
                       ({"loss": "hybrid"}, ("dit.loss", "dit.learn_sigma")),
                       ({"loss": "simple", "learn_sigma": True}, ("dit.loss", "dit.learn_sigma")),
                       ({"timestep_sampler": "loss_aware"}, ("dit.timestep_sampler", "dit.loss"))):
        with pytest.raises(ValueError) as error:
            DitConfig(**bad)
        assert all(name in str(error.value) for name in names), (bad, str(error.value))
    # the defaults leave the cache key as it was
    assert not {"loss", "timestep_sampler"} & set(DitConfig().cache_relevant())
    assert DitConfig(learn_sigma=True, loss="vlb").cache_relevant()["loss"] == "vlb"


def test_a_loss_aware_dit_trains_through_the_trainer_and_resumes_with_the_same_history(tmp_path):
    from safetensors.torch import load_file

    from components.common.checkpoint import TASK_STATE_FILE
    from components.common.train_loop import LocalSession, train_loop
    from components.dit.task import LatentDitTask
    from components.dit.train import build_step_dit
    from crash_hooks import CrashAtStep
    from test_dit import CLASSES, LATENT, dit_cfg, synthetic_latents

    class CrashingAtStep6(CrashAtStep, LatentDitTask):
        crash_at_step = 6

    # 4 timesteps, 16 terms a step: every history is full after 3 steps, so steps 4-8 draw by importance
    cfg = dit_cfg(learn_sigma=True, loss="vlb", timestep_sampler="loss_aware", num_timesteps=4,
                  train={"max_steps": 8, "batch_size": 16, "checkpoint_every": 4, "log_every": 1})
    kwargs = build_step_dit(cfg, LATENT, len(CLASSES)).arguments
    data = synthetic_latents(64)
    whole = LatentDitTask(cfg, kwargs, {}, in_memory=data)
    final = train_loop(whole, cfg.train, LocalSession(tmp_path / "whole"), None)
    assert final["step"] == 8 and final["vlb"] > 0
    assert whole.timestep_sampler.warmed_up and int(whole.timestep_sampler.counts.sum()) == 4 * HISTORY
    assert not torch.allclose(whole.timestep_sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))

    with pytest.raises(RuntimeError, match="injected failure at step 6"):
        train_loop(CrashingAtStep6(cfg, kwargs, {}, in_memory=data), cfg.train, LocalSession(tmp_path / "cut"), None)
    saved = load_file(str(tmp_path / "cut" / "checkpoint_000000" / TASK_STATE_FILE))  # the step-4 checkpoint
    assert saved["loss_counts"].tolist() == [HISTORY] * 4
    resumed = LatentDitTask(cfg, kwargs, {}, in_memory=data)
    again = train_loop(resumed, cfg.train, LocalSession(tmp_path / "cut"), None)
    assert again["resumed_from_step"] == 4
    assert torch.equal(resumed.timestep_sampler.history, whole.timestep_sampler.history)
    assert torch.equal(resumed.timestep_sampler.counts, whole.timestep_sampler.counts)
    assert again["loss"] == final["loss"]


def _two_rank_history(rank: int, store_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from components.dit.task import gathered_terms

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    sampler = LossAwareSampler(3)
    for step in range(HISTORY):  # each rank its own terms, rank 1 one more of them
        n = 2 + rank
        t = torch.tensor([(step + rank + i) % 3 for i in range(n)])
        sampler.update(*gathered_terms(t, torch.full((n,), float(10 * rank + step))))
    torch.save(sampler.state(), f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_every_rank_holds_the_same_history(tmp_path):
    """Two gloo ranks feeding different terms (and counts) end with one history: all ranks' terms, rank order."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_history, args=(str(tmp_path / "store"), str(tmp_path / "state")), nprocs=2)
    states = [torch.load(tmp_path / f"state.{rank}") for rank in (0, 1)]
    assert torch.equal(states[0]["loss_history"], states[1]["loss_history"])
    assert int(states[0]["loss_counts"].sum()) == 3 * HISTORY  # 5 terms a step, 50 in all: every t full
    assert {10.0 * 1 + HISTORY - 1, HISTORY - 1.0} <= set(states[0]["loss_history"].flatten().tolist())
