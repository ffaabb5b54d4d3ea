"""Every sampler by its config name, and one entry that runs any of them.

Here rather than in samplers.py because score.py builds on samplers.py. The samplers share one signature
(samplers.py); their further keyword options carry the sampling configs' field names (``eta``, ``snr``,
``corrector_steps``, ``pc_predictor``, ``langevin_steps``, ``langevin_step_size``), so a config's values are
picked for a sampler by name (``config_options``), never by a table per sampler.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from components.diffusion.consistency_sampler import consistency_sample
from components.diffusion.noise import NoiseStream
from components.diffusion.samplers import ExtraArgs, ddim_sample, ddpm_sample
from components.diffusion.schedule import NoiseSchedule
from components.diffusion.score import langevin_sample, pc_sample

SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "langevin": langevin_sample, "pc": pc_sample,
            "consistency": consistency_sample}
# The positional arguments and the keywords that every sampler takes; the rest of a signature are its options.
COMMON = ("denoiser", "x", "timesteps", "schedule", "noise", "extra_args")


def sampler_options(name: str) -> list[str]:
    """The keyword options of sampler ``name`` beyond the common arguments, in signature order."""
    return [p for p in inspect.signature(_sampler(name)).parameters if p not in COMMON]


def config_options(name: str, config: Any) -> dict[str, Any]:
    """The values ``config`` (a sampling config) holds for sampler ``name``'s options, found by field name."""
    return {option: getattr(config, option) for option in sampler_options(name) if hasattr(config, option)}


def run_sampler(name: str, denoiser, x: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule, *,
                noise: NoiseStream | None = None, extra_args: ExtraArgs = None, **options: Any):
    """``SAMPLERS[name](denoiser, x, timesteps, schedule, noise=..., extra_args=..., **options)``, after
    refusing, naming them, the options that sampler does not take. ``stop_at=None`` (clean data, where
    every sampler ends) is accepted by all."""
    sampler = _sampler(name)
    if options.get("stop_at", 0) is None:
        del options["stop_at"]
    unknown = sorted(set(options) - set(sampler_options(name)))
    if unknown:
        able = [other for other in SAMPLERS if all(o in sampler_options(other) for o in unknown)]
        hint = f"; {', '.join(able)} take {'it' if len(unknown) == 1 else 'them'}" if able else ""
        raise ValueError(f"the {name} sampler does not take {', '.join(unknown)}{hint}")
    return sampler(denoiser, x, timesteps, schedule, noise=noise, extra_args=extra_args, **options)


def _sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
