"""Every vLLM engine runs the W4A16 π_q: never the int8-activation W4A8 kernel, on any CPU.

vLLM's CPU W4 kernel (`CPUWNA16LinearKernel`) picks W4A8 when the CPU has AMX, activations are bf16
and `VLLM_CPU_INT4_W4A8` is on (its default). The development machines have no AMX, so the branch
the other CPUs take is forced here: a fresh interpreter gets the environment our engines get
(`engine_settings`), AMX is reported present, and the real kernel class decides for a layer of the
embedded model's shape. The control run without our environment must pick W4A8 — otherwise the test
would not be exercising that branch at all.
"""

import json
import os
import subprocess
import sys

import pytest

from qdpo_ray.config import ServeConfig, VllmEngineConfig
from qdpo_ray.generate.engine import W4A16_ENV, engine_settings

_PROBE = r"""
import json, os, sys
import torch
os.environ.update(json.loads(sys argv_env))
torch.cpu._is_amx_tile_supported = lambda: True          # the AMX Xeon's answer
from vllm.model_executor.kernels.linear.mixed_precision import cpu as k
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
from vllm.scalar_type import scalar_types

chosen = []
k.CPUWNA16LinearKernel._process_gptq_weights_w4a8 = lambda self, layer: chosen.append("w4a8")
k.CPUWNA16LinearKernel._process_gptq_weights_w4a16 = lambda self, layer: chosen.append("w4a16")
IN, OUT = 576, 1536                                       # SmolLM2-135M's MLP up projection
cfg = MPLinearLayerConfig(full_weight_shape=(IN, OUT), partition_weight_shape=(IN, OUT),
                          weight_type=scalar_types.uint4, act_type=torch.bfloat16, group_size=-1,
                          zero_points=True)
kernel = k.CPUWNA16LinearKernel(cfg, "weight_packed", "weight_scale", "weight_zero_point")
layer = torch.nn.Module()
def param(t, **attrs):
    p = torch.nn.Parameter(t, requires_grad=False)
    for a, v in attrs.items():
        setattr(p, a, v)
    return p
layer.weight_packed = param(torch.zeros(OUT, IN // 8, dtype=torch.int32), input_dim=1, packed_dim=1, output_dim=0)
layer.weight_scale = param(torch.ones(OUT, 1, dtype=torch.bfloat16), output_dim=0)
layer.weight_zero_point = param(torch.zeros(OUT // 8, 1, dtype=torch.int32), output_dim=0, packed_dim=0)
layer.bias = None
kernel.process_weights_after_loading(layer)
print(json.dumps({"use_w4a8": bool(layer.use_w4a8), "processed": chosen}))
""".replace("sys argv_env", "sys.argv[1]")


def _kernel_choice(env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_INT4_W4A8"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(env)], capture_output=True, text=True,
                          timeout=300, env=clean)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_engine_environment_pins_w4a16():
    for e in (VllmEngineConfig(), VllmEngineConfig(gpus_per_actor=1), ServeConfig().engine):
        _, env, _ = engine_settings(e.model_copy(update={"dtype": "float16"}), seed=0)
        assert env["VLLM_CPU_INT4_W4A8"] == "0"


@pytest.mark.vllm
def test_amx_cpu_takes_the_w4a16_kernel_with_our_environment():
    _, env, _ = engine_settings(VllmEngineConfig(dtype="bfloat16"), seed=0)
    ours = _kernel_choice(env)
    assert ours == {"use_w4a8": False, "processed": ["w4a16"]}
    # control: vLLM's default on the same (simulated) AMX CPU is the int8-activation kernel
    default = _kernel_choice({k: v for k, v in env.items() if k not in W4A16_ENV})
    assert default == {"use_w4a8": True, "processed": ["w4a8"]}


def test_subprocess_engines_get_the_w4a16_environment(monkeypatch):
    """`vllm_greedy` (tests, benchmarks) forces the switch off even if the caller's environment sets it."""
    from qdpo_ray.generate.engine import apply_w4a16_env

    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")
    env = apply_w4a16_env(dict(os.environ))
    assert env["VLLM_CPU_INT4_W4A8"] == "0"
