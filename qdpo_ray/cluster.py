"""Connecting to Ray: the cluster named by RAY_ADDRESS (e.g. under `ray job submit`), else a local one."""

from __future__ import annotations

import os


def ensure_ray(logical_cpus_needed: int) -> None:
    """Start or join Ray once. Locally, admit at least `logical_cpus_needed` CPUs of actors/workers.

    A laptop has fewer cores than two vLLM engine pools plus their helpers reserve; the engines' real
    thread counts are set per actor (OMP_NUM_THREADS), so a larger logical CPU count only admits them.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, logical_cpus_needed))
