"""Settings of one vLLM engine inside Ray (pairs' Ray Data actors and Serve's LLM replicas share them).

Every engine this project starts must compute the W4A16 π_q that QDPO trains against: 4-bit weights,
16-bit activations. vLLM's CPU build has a second W4 kernel that, on CPUs with AMX (`amx_int8`) and bf16
activations, quantizes the *activations* to int8 (W4A8, `VLLM_CPU_INT4_W4A8`, on by default). That is a
different model from π_q — the rejected answers would not be π_q's and the served "W4" model not the
trained one — and on the embedded model's shapes its weight repacking crashes the engine. So the switch
is set off here, in the one place every engine's environment is built, whatever CPU the engine lands on
(an AMD laptop and an AMX Xeon node of the same cluster must give the same pairs).
"""

from __future__ import annotations

import os
from typing import Any

from qdpo_ray.config import VllmEngineConfig

# Environment that pins vLLM to the W4A16 kernels. On GPUs the variable is unknown and ignored.
W4A16_ENV = {"VLLM_CPU_INT4_W4A8": "0"}


def apply_w4a16_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Force the W4A16 settings into `environ` (default: this process's), overriding a user's value:
    an int8-activation engine is never the model QDPO trains, so it is not a preference to honour."""
    environ = os.environ if environ is None else environ
    environ.update(W4A16_ENV)
    return environ


def engine_settings(e: VllmEngineConfig, seed: int) -> tuple[dict[str, Any], dict[str, str], list[dict]]:
    """(vLLM engine kwargs, environment variables, placement-group bundles) for one engine."""
    on_gpu = e.gpus_per_actor > 0
    engine_kwargs: dict[str, Any] = dict(
        dtype=e.dtype, max_model_len=e.max_model_len, enforce_eager=e.enforce_eager,
        tensor_parallel_size=e.tensor_parallel_size, seed=seed, trust_remote_code=False,
        enable_prefix_caching=e.enable_prefix_caching)
    env = apply_w4a16_env({"VLLM_CPU_KVCACHE_SPACE": str(e.kv_cache_gib)})
    custom = dict(e.resources)
    if on_gpu:
        engine_kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
        bundles = [{"GPU": 1, "CPU": 1, **custom}] * e.tensor_parallel_size
    else:
        # vLLM's automatic CPU binding pins every engine on a node to the same core; let each engine
        # use the threads it reserved instead.
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(max(1, int(e.cpus_per_actor))))
        bundles = [{"CPU": e.cpus_per_actor, **custom}]
    return engine_kwargs, env, bundles
