"""Progress bars that render properly wherever the code runs.

Inside a Ray task or actor, plain tqdm writes carriage-return updates into the worker's log stream,
which reaches the driver as a new line per update; Ray's ``tqdm_ray`` sends bar state to the driver,
which draws it in place. In the driver (or without Ray) plain tqdm is used.
"""

from __future__ import annotations


def in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - no Ray, or not connected: not a worker
        return False


def progress_bar(total: int | None, desc: str, unit: str = "it"):
    """A bar with ``update(n)``, ``set_description(text)`` and ``close()`` (also a context manager)."""
    if in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
