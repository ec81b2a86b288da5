"""The vLLM answer engine of the MT-Bench judge runs as a Ray task holding `evaluate.judge.engine`'s
resources (on a cluster a GPU node's GPU, the driver needing none), not in the driver process."""

import os

import pytest

from qdpo_ray.config import ConfigError, VllmEngineConfig, load_config
from qdpo_ray.evaluate.answers import answer_task_options, vllm_dtype


def test_task_options_are_the_engine_factorys_bundle():
    cpu = answer_task_options(VllmEngineConfig(cpus_per_actor=3, kv_cache_gib=2))
    assert (cpu["num_cpus"], cpu["num_gpus"], "resources" in cpu) == (3, 0, False)
    env = cpu["runtime_env"]["env_vars"]
    assert env["VLLM_CPU_INT4_W4A8"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "OMP_NUM_THREADS" not in env  # one engine at a time keeps vLLM's binding over the node's cores

    gpu = answer_task_options(VllmEngineConfig(gpus_per_actor=1, resources={"gpu_pool": 1}))
    assert (gpu["num_gpus"], gpu["num_cpus"], gpu["resources"]) == (1, 1, {"gpu_pool": 1})
    assert vllm_dtype(VllmEngineConfig(gpus_per_actor=1)) == "float16"  # the packed W4A16 kernel of a GPU


@pytest.mark.parametrize("field, value", [("tensor_parallel_size", 2), ("gpus_per_actor", 0.5)])
def test_settings_the_answer_engine_cannot_take_are_refused_before_any_work(tmp_path, field, value):
    from qdpo_ray.evaluate.compare import run_evaluate

    cfg = load_config("configs/evaluate_judge.yaml", [f"out={tmp_path / 'ev'}", "evaluate.judge.answer_engine=vllm",
                                                      f"evaluate.judge.engine.{field}={value}"])
    with pytest.raises(ConfigError, match=rf"evaluate\.judge\.engine\.{field}="):
        run_evaluate(cfg)
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_answers_are_generated_by_a_ray_task_with_the_engines_resources(embedded_model_dir):
    import ray

    from qdpo_ray.config import ModelConfig
    from qdpo_ray.data import format_prompt
    from qdpo_ray.evaluate.answers import generate_on_ray
    from qdpo_ray.generate.hf import greedy_generate
    from qdpo_ray.models import load_model, load_tokenizer

    mc = ModelConfig(name=embedded_model_dir)
    tok = load_tokenizer(mc)
    ids = [format_prompt(tok, [q], mc) for q in ("What is the capital of France?", "Name a prime number.")]
    if ray.is_initialized():
        ray.shutdown()
    # a resource only this "node" has: the task runs only if its options carry the engine's resources
    ray.init(num_cpus=4, resources={"answer_node": 1}, include_dashboard=False)
    try:
        res = generate_on_ray(embedded_model_dir, ids, 8, engine=VllmEngineConfig(resources={"answer_node": 1}))
    finally:
        ray.shutdown()
    assert res["worker"]["pid"] != os.getpid()
    assert res["worker"]["resources"] == {"CPU": 1.0, "answer_node": 1.0}
    want = greedy_generate(load_model(mc, dtype="float32"), tok, ids, 8, 2)
    if vllm_dtype() == "float32":  # the dense fp32 engine of a CPU without the W4 kernel: fp32 transformers' tokens
        assert res["token_ids"] == want
    else:
        assert [a[0] for a in res["token_ids"]] == [w[0] for w in want]
    assert all(0 < len(a) <= 8 for a in res["token_ids"])
