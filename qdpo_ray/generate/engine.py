"""Settings of one vLLM engine inside Ray (pairs' Ray Data actors and Serve's LLM replicas share them)."""

from __future__ import annotations

from typing import Any

from qdpo_ray.config import VllmEngineConfig


def engine_settings(e: VllmEngineConfig, seed: int) -> tuple[dict[str, Any], dict[str, str], list[dict]]:
    """(vLLM engine kwargs, environment variables, placement-group bundles) for one engine."""
    on_gpu = e.gpus_per_actor > 0
    engine_kwargs: dict[str, Any] = dict(
        dtype=e.dtype, max_model_len=e.max_model_len, enforce_eager=e.enforce_eager,
        tensor_parallel_size=e.tensor_parallel_size, seed=seed, trust_remote_code=False,
        enable_prefix_caching=False)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(e.kv_cache_gib)}
    if on_gpu:
        engine_kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
        bundles = [{"GPU": 1, "CPU": 1}] * e.tensor_parallel_size
    else:
        # vLLM's automatic CPU binding pins every engine on a node to the same core; let each engine
        # use the threads it reserved instead.
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(max(1, int(e.cpus_per_actor))))
        bundles = [{"CPU": e.cpus_per_actor}]
    return engine_kwargs, env, bundles
