"""Settings of one vLLM engine inside Ray (pairs' Ray Data actors and Serve's LLM replicas share them).

Every engine this project starts must compute the W4A16 π_q that QDPO trains against: 4-bit weights,
16-bit activations. vLLM's CPU build has a second W4 kernel that, on CPUs with AMX (`amx_int8`) and bf16
activations, quantizes the *activations* to int8 (W4A8, `VLLM_CPU_INT4_W4A8`, on by default). That is a
different model from π_q — the rejected answers would not be π_q's and the served "W4" model not the
trained one — and on the embedded model's shapes its weight repacking crashes the engine. So the switch
is set off here, in the one place every engine's environment is built, whatever CPU the engine lands on
(an AMD laptop and an AMX Xeon node of the same cluster must give the same pairs).

The same kernel is missing altogether from vLLM's AVX2 build (x86 CPUs without AVX-512, e.g. AMD Zen 2/3):
a packed checkpoint loads there and the engine dies at its first forward, which Ray Data answers by
restarting it forever. `w4_engine_dir` decides once, for every engine of a pool, whether π_q runs packed
or as its de-quantized dense copy (`qdpo_ray.quant.dense`), so all engines compute the same model.
"""

from __future__ import annotations

import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

from qdpo_ray.config import VllmEngineConfig

log = logging.getLogger(__name__)

# Environment that pins vLLM to the W4A16 kernels. On GPUs the variable is unknown and ignored.
W4A16_ENV = {"VLLM_CPU_INT4_W4A8": "0"}

# KV-cache block, in tokens, of CPU engines that live on prefix caching (anchored continuations, beam search).
# vLLM caches full blocks only and a CPU block is 128 tokens by default, so a prefix shorter than that is
# never reused; the CPU kernels want multiples of 32. GPUs keep vLLM's 16.
CPU_PREFIX_BLOCK = 32


def apply_w4a16_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Force the W4A16 settings into `environ` (default: this process's), overriding a user's value:
    an int8-activation engine is never the model QDPO trains, so it is not a preference to honour."""
    environ = os.environ if environ is None else environ
    environ.update(W4A16_ENV)
    return environ


def engine_settings(e: VllmEngineConfig, seed: int, block_size: int | None = None
                    ) -> tuple[dict[str, Any], dict[str, str], list[dict]]:
    """(vLLM engine kwargs, environment variables, placement-group bundles) for one engine; `block_size`:
    its KV-cache block in tokens (None: vLLM's default, 128 on CPU and 16 on GPU)."""
    if e.dtype == "auto":  # vLLM's own "auto" would take each checkpoint's dtype: fp and π_q could differ
        raise ValueError("engine dtype 'auto' is resolved with the W4 kernel first (resolve_dtype)")
    on_gpu = e.gpus_per_actor > 0
    engine_kwargs: dict[str, Any] = dict(
        dtype=e.dtype, max_model_len=e.max_model_len, enforce_eager=e.enforce_eager,
        tensor_parallel_size=e.tensor_parallel_size, seed=seed, trust_remote_code=False,
        enable_prefix_caching=e.enable_prefix_caching, **({"block_size": block_size} if block_size else {}))
    env = apply_w4a16_env({"VLLM_CPU_KVCACHE_SPACE": str(e.kv_cache_gib)})
    if on_gpu:
        engine_kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
        # vLLM's Ray executor (tensor_parallel_size > 1) asks this much GPU per rank of its bundles
        env["VLLM_RAY_PER_WORKER_GPUS"] = str(e.gpus_per_actor)
    else:
        # vLLM's automatic CPU binding pins every engine on a node to the same core; let each engine
        # use the threads it reserved instead.
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(max(1, int(e.cpus_per_actor))))
    return engine_kwargs, env, engine_bundles(e)


def engine_bundles(e: VllmEngineConfig, field: str = "engine") -> list[dict[str, float]]:
    """The placement-group bundles of one engine: on GPUs one bundle per tensor-parallel rank with
    `gpus_per_actor` GPUs and one CPU each (a fraction of a GPU packs several small engines on one card);
    on CPUs one bundle with `cpus_per_actor` CPUs. `e.resources` goes into every bundle."""
    from qdpo_ray.config import ConfigError

    custom = dict(e.resources)
    g = e.gpus_per_actor
    if g <= 0:
        return [{"CPU": e.cpus_per_actor, **custom}]
    if g > 1:
        raise ConfigError(f"{field}.gpus_per_actor={g:g}: GPUs per tensor-parallel rank, and a vLLM rank uses "
                          f"one GPU at most; set {field}.gpus_per_actor=1 and {field}.tensor_parallel_size="
                          f"{e.tensor_parallel_size * math.ceil(g)} to spread the model over more GPUs")
    if g < 1 and e.gpu_memory_utilization > g:
        raise ConfigError(f"{field}.gpus_per_actor={g:g} shares a GPU between engines, but each would claim "
                          f"{field}.gpu_memory_utilization={e.gpu_memory_utilization:g} of its memory; set "
                          f"{field}.gpu_memory_utilization to at most {g:g} (e.g. {0.9 * g:.2f})")
    return [{"GPU": g, "CPU": 1, **custom} for _ in range(e.tensor_parallel_size)]


def cpu_has_w4_kernel(avx512: bool | None = None, machine: str | None = None) -> bool:
    """Whether the vLLM ops library this CPU loads has the W4A16 kernel (`cpu_gemm_wna16`).

    vLLM picks its x86 library the same way (`CpuPlatform.import_kernels`): `_C` (AVX-512 + bf16) and
    `_C_AVX512` carry the kernel, `_C_AVX2` does not. Other architectures build it into their one `_C`.
    """
    import torch

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return True
    return torch.cpu._is_avx512_supported() if avx512 is None else avx512


def nodes_without_w4_kernel(custom_resources: dict[str, float]) -> list[str]:
    """Addresses of the live Ray nodes that could host such an engine (CPU plus `custom_resources`) and
    lack the kernel; a zero-CPU probe task runs on each of them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(cpu_has_w4_kernel)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0
             and all(n["Resources"].get(k, 0) >= v for k, v in custom_resources.items())]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    return [n["NodeManagerAddress"] for n, ok in zip(nodes, ray.get(refs)) if not ok]


def resolve_dtype(e: VllmEngineConfig, w4_engine: str, field: str = "engine") -> VllmEngineConfig:
    """`e` with a concrete dtype for engines whose π_q runs `w4_engine` ("packed" | "dense")."""
    from qdpo_ray.config import ConfigError

    if e.dtype == "auto":
        return e.model_copy(update={"dtype": "float32" if w4_engine == "dense" else "float16"})
    if e.dtype == "float32" and w4_engine == "packed":
        raise ConfigError(f"{field}.dtype=float32: vLLM's W4A16 kernel computes in bfloat16/float16 only; use "
                          f"{field}.dtype=auto or float16, or {field}.w4_kernel=dense")
    return e


def w4_engine_dir(w4_dir: str, e: VllmEngineConfig, dense_root: str | Path) -> tuple[str, str]:
    """(directory the π_q engines load, "packed" | "dense") for the packed checkpoint `w4_dir`.

    `e.w4_kernel=auto` probes the live Ray nodes (or this machine when Ray is not running); one node
    without the kernel makes the whole pool dense, so every engine computes the same π_q.
    """
    mode = e.w4_kernel
    if e.gpus_per_actor > 0:
        mode = "packed"  # vLLM's GPU W4A16 kernels (Marlin and others) run the packed format
    elif mode == "auto" and e.dtype == "float32":
        mode = "dense"  # the packed kernel has no fp32 path
    elif mode == "auto":
        import ray

        lacking = (nodes_without_w4_kernel(dict(e.resources)) if ray.is_initialized()
                   else ([] if cpu_has_w4_kernel() else [platform.node()]))
        mode = "dense" if lacking else "packed"
        if lacking:
            log.warning("vLLM has no CPU W4A16 kernel without AVX-512 (nodes: %s): the π_q engines run the "
                        "de-quantized copy of %s (same model, dense speed)", ", ".join(lacking), w4_dir)
    if mode == "packed":
        return w4_dir, mode
    from qdpo_ray.quant.dense import ensure_dense_copy

    return ensure_dense_copy(w4_dir, dense_root), mode
