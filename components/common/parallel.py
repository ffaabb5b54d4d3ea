"""Fan-out of a data step's work over Ray tasks, with a bound on how many run at once."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator


def bounded_imap(fn: Callable[..., Any], jobs: Iterable[tuple], max_in_flight: int,
                 num_cpus: float = 1.0) -> Iterator[Any]:
    """Run ``fn(*job)`` as a Ray task per job, at most ``max_in_flight`` at a time (so a step
    declared with N workers never floods the cluster), yielding results as they finish. Tasks
    still pending when the caller stops iterating (an error, a bad input) are cancelled."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=0)(fn)
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
