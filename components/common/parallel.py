"""Fan-out of a data step's work over Ray: a bound on how many tasks run at once, and a check that a
step's worker pool fits the cluster at all."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from components.common.config import StepResources


def bounded_imap(fn: Callable[..., Any], jobs: Iterable[tuple], max_in_flight: int,
                 num_cpus: float = 1.0, num_gpus: float = 0.0) -> Iterator[Any]:
    """Run ``fn(*job)`` as a Ray task per job, at most ``max_in_flight`` at a time (so a step
    declared with N workers never floods the cluster), yielding results as they finish. Tasks
    still pending when the caller stops iterating (an error, a bad input) are cancelled."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn)
    jobs = iter(jobs)
    pending: list = []
    try:
        while True:
            while len(pending) < max_in_flight:
                job = next(jobs, None)
                if job is None:
                    break
                pending.append(task.remote(*job))
            if not pending:
                return
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


def check_pool_fits_cluster(step: str, resources: "StepResources") -> None:
    """Refuse a pool of ``num_workers`` workers the Ray cluster can never hold: Ray would wait for
    its actors forever instead of failing. Skipped where the cluster autoscales
    (``LATENTFLOW_AUTOSCALING=1``, as the trainer's check): nodes that do not exist yet may come."""
    import ray

    if not ray.is_initialized() or os.environ.get("LATENTFLOW_AUTOSCALING") == "1":
        return
    total = ray.cluster_resources()
    for kind, key in (("CPU", "cpus_per_worker"), ("GPU", "gpus_per_worker")):
        per_worker = getattr(resources, key)
        wanted, have = resources.num_workers * per_worker, total.get(kind, 0.0)
        if wanted > have + 1e-9:
            raise ValueError(f"{step}.resources.num_workers ({resources.num_workers}) x {step}.resources.{key} "
                             f"({per_worker:g}) = {wanted:g} {kind}s, but the Ray cluster has {have:g}; lower "
                             "them (fractional CPUs are fine) or add nodes (LATENTFLOW_AUTOSCALING=1 on an "
                             "autoscaling cluster)")
