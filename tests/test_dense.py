"""Where vLLM has no CPU W4 kernel, π_q engines run the de-quantized copy of the packed checkpoint.

The kernel test reads vLLM's own three x86 ops libraries, so the branch of every other CPU kind is checked
on whichever CPU runs the suite: the AVX2 library lacks `cpu_gemm_wna16`, the AVX-512 ones have it.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from qdpo_ray.config import QuantConfig, VllmEngineConfig
from qdpo_ray.generate.engine import cpu_has_w4_kernel, w4_engine_dir
from qdpo_ray.quant.dense import MARKER, ensure_dense_copy
from qdpo_ray.quant.export import export_packed
from qdpo_ray.quant.fake_quant import quantize_model_rtn, to_fake_quant


def _packed(tiny_llama, path, cfg=QuantConfig(bits=4)):
    return export_packed(to_fake_quant(copy.deepcopy(tiny_llama), cfg), None, cfg, path, storage_dtype=torch.float32)


def test_dense_copy_is_exactly_the_packed_model(tiny_llama, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    w4 = _packed(tiny_llama, tmp_path / "w4")
    dense = Path(ensure_dense_copy(w4, tmp_path / "cache"))
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    with safe_open(str(dense / "model.safetensors"), "pt") as f:
        assert {k.rsplit(".", 1)[1] for k in f.keys()} == {"weight"}  # plain Linear/embedding/norm tensors
    ids = torch.randint(0, 512, (2, 16))
    rtn = quantize_model_rtn(copy.deepcopy(tiny_llama), QuantConfig(bits=4))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)(ids).logits,
                           rtn(ids).logits)
    assert json.loads((dense / MARKER).read_text())["source"] == str(Path(w4).resolve())


def test_dense_copy_is_made_once_and_follows_the_checkpoint(tiny_llama, tmp_path):
    w4 = _packed(tiny_llama, tmp_path / "w4")
    first = ensure_dense_copy(w4, tmp_path / "cache")
    stamp = (Path(first) / "model.safetensors").stat().st_mtime_ns
    assert ensure_dense_copy(w4, tmp_path / "cache") == first
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    _packed(tiny_llama, w4, QuantConfig(bits=4, group_size=32))  # re-quantized in place
    second = ensure_dense_copy(w4, tmp_path / "cache")
    assert second != first  # a changed checkpoint never reuses a stale copy


def _ops_library_has_kernel(name: str) -> bool:
    import vllm

    return b"cpu_gemm_wna16" in (Path(vllm.__file__).parent / f"{name}.abi3.so").read_bytes()


@pytest.mark.vllm
def test_kernel_check_agrees_with_each_vllm_ops_library():
    pytest.importorskip("vllm")
    import vllm

    libs = {p.name.split(".")[0] for p in Path(vllm.__file__).parent.glob("_C*.abi3.so")}
    if not {"_C", "_C_AVX2", "_C_AVX512"} <= libs:
        pytest.skip(f"not vLLM's x86 CPU build (ops libraries {sorted(libs)})")
    # vLLM loads _C or _C_AVX512 on AVX-512 CPUs, _C_AVX2 otherwise (CpuPlatform.import_kernels)
    assert _ops_library_has_kernel("_C") and _ops_library_has_kernel("_C_AVX512")
    assert cpu_has_w4_kernel(avx512=True, machine="x86_64")
    assert not _ops_library_has_kernel("_C_AVX2")
    assert not cpu_has_w4_kernel(avx512=False, machine="x86_64")


def test_engine_dir_follows_the_kernel(tiny_llama, tmp_path, monkeypatch):
    w4 = str(_packed(tiny_llama, tmp_path / "w4"))
    cpu = VllmEngineConfig()
    assert w4_engine_dir(w4, cpu.model_copy(update={"w4_kernel": "packed"}), tmp_path) == (w4, "packed")
    dense, mode = w4_engine_dir(w4, cpu.model_copy(update={"w4_kernel": "dense"}), tmp_path)
    assert mode == "dense" and (Path(dense) / MARKER).is_file() and Path(dense).parent == tmp_path
    gpu = cpu.model_copy(update={"gpus_per_actor": 1.0, "w4_kernel": "dense"})
    assert w4_engine_dir(w4, gpu, tmp_path) == (w4, "packed")  # GPU W4A16 kernels run the packed format
    import qdpo_ray.generate.engine as engine

    for has_kernel, want in ((True, "packed"), (False, "dense")):  # auto, without Ray: this machine decides
        monkeypatch.setattr(engine, "cpu_has_w4_kernel", lambda has=has_kernel: has)
        assert w4_engine_dir(w4, cpu, tmp_path)[1] == want


def test_engine_dtype_follows_the_kernel():
    from qdpo_ray.config import ConfigError
    from qdpo_ray.generate.engine import engine_settings, resolve_dtype

    auto = VllmEngineConfig()
    assert auto.dtype == "auto"
    assert resolve_dtype(auto, "dense").dtype == "float32"  # exactly training's fp32 π_q
    assert resolve_dtype(auto, "packed").dtype == "float16"  # the W4A16 kernel has no fp32 path
    assert resolve_dtype(auto.model_copy(update={"dtype": "bfloat16"}), "dense").dtype == "bfloat16"
    with pytest.raises(ConfigError, match="pairs.engine.dtype=float32"):
        resolve_dtype(auto.model_copy(update={"dtype": "float32"}), "packed", "pairs.engine")
    with pytest.raises(ValueError, match="w4_kernel=packed"):
        VllmEngineConfig(dtype="float32", w4_kernel="packed")
    with pytest.raises(ValueError, match="resolve_dtype"):
        engine_settings(auto, seed=0)  # never vLLM's own "auto" (each checkpoint's dtype)
    # an fp32 engine config can only run the dense copy, whatever this CPU has
    assert VllmEngineConfig(dtype="float32").w4_kernel == "auto"


def test_pairs_engines_run_the_exact_pi_q_on_every_cpu(tiny_llama, tmp_path, monkeypatch):
    """Pairs default to the dense fp32 π_q whatever the CPU has (one code path on AMD, AVX-512 and AVX2);
    a GPU pool still runs the packed checkpoint in fp16."""
    import qdpo_ray.generate.engine as engine
    from qdpo_ray.config import load_config
    from qdpo_ray.generate.engine import resolve_dtype

    w4 = str(_packed(tiny_llama, tmp_path / "w4"))
    pairs = load_config(None, []).pairs.engine
    for has_kernel in (True, False):
        monkeypatch.setattr(engine, "cpu_has_w4_kernel", lambda has=has_kernel: has)
        _, mode = w4_engine_dir(w4, pairs, tmp_path)
        assert mode == "dense" and resolve_dtype(pairs, mode).dtype == "float32"
    gpu = pairs.model_copy(update={"gpus_per_actor": 1.0})
    _, mode = w4_engine_dir(w4, gpu, tmp_path)
    assert mode == "packed" and resolve_dtype(gpu, mode).dtype == "float16"
    assert load_config(None, []).serve.engine.w4_kernel == "auto"  # Serve runs vLLM's W4 kernel where it can
