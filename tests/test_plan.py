"""The planner: exact parameter counts from a meta-device build, per-stage memory arithmetic, the shipped
Vicuna-7B config fitting 8 × 80 GB, the warning (and --strict exit) for a run that cannot fit, the CLI table."""

import json
from pathlib import Path

import pytest

from qdpo_ray import plan as pl
from qdpo_ray.config import ConfigError, load_config
from qdpo_ray.train import memory

REPO = Path(__file__).resolve().parent.parent
PAPER = str(REPO / "configs" / "paper_vicuna7b_hh.yaml")
GiB = 2**30


def _tiny_config(tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def vicuna():
    return pl.model_shape(pl.load_model_config("lmsys/vicuna-7b-v1.5"))


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_counts_are_exact(tied):
    V, h, i, L, kv = 100, 64, 128, 2, 2 * 16  # 2 kv heads of head_dim 64 / 4 = 16
    decoder_linear = L * (2 * h * h + 2 * h * kv + 3 * h * i)
    s = pl.model_shape(_tiny_config(tied))
    assert s.quantized == decoder_linear and s.quantized_rows == L * (h + kv + kv + h + i + i + h)
    assert s.linear == decoder_linear + (0 if tied else V * h)
    assert s.other == V * h + L * 2 * h + h  # embedding, two norms per layer, the final norm
    assert s.params == s.linear + s.other
    assert (s.layers, s.hidden, s.kv_dim, s.head_dim, s.vocab, s.tied) == (L, h, kv, 16, V, tied)
    # and the count a real (materialised) model reports
    from transformers import LlamaForCausalLM

    assert s.params == sum(p.numel() for p in LlamaForCausalLM(_tiny_config(tied)).parameters())


def test_tiny_llama_train_memory_is_the_arithmetic_of_its_parts():
    s = pl.model_shape(_tiny_config())
    cfg = load_config(None, ["train.objective=qdpo_flips+kd", "train.zero_stage=2", "train.num_workers=1",
                             "train.per_device_batch_size=4", "train.max_prompt_len=32", "train.max_response_len=16"])
    dev, host = pl.train_memory(s, cfg)
    parts = {p.name: p.gib * GiB for p in dev}
    assert parts["policy states"] == pytest.approx(s.params * 20)  # 4 weight + 4 grad + 4 fp32 copy + 8 Adam
    assert parts["teacher"] == pytest.approx(s.params * 4) and parts["reference"] == pytest.approx(s.params * 4)
    tokens = 4 * (32 + 16)  # chosen-only rows of the token-level objective
    per_layer_token = 4 * (64 + 4 * 64 + 2 * 32 + 2 * 128)
    layer_w = (s.linear - 100 * 64) // 2
    assert parts["activations"] == pytest.approx(tokens * per_layer_token * 2 + 2 * tokens * per_layer_token
                                                 + layer_w * 8)
    from qdpo_ray.train.losses import CHUNK_BYTES

    assert parts["logits"] == pytest.approx(7 * tokens * 100 * 4 + 2 * CHUNK_BYTES)
    assert "teacher" not in {p.name for p in pl.train_memory(s, load_config(None, ["train.objective=qdpo"]))[0]}
    assert host == []  # a CPU worker: everything is in the one process


def test_bf16_frozen_models_hold_2_byte_linears_and_zero3_shards_the_policy(vicuna):
    cfg = load_config(PAPER, ["train.objective=qdpo_flips+kd"])
    parts = {p.name: p.gib * GiB for p in pl.train_memory(vicuna, cfg)[0]}
    assert parts["policy states"] == pytest.approx(vicuna.params * 16 / 8)
    assert parts["teacher"] == pytest.approx(memory.model_bytes("bf16", "teacher", vicuna.linear, vicuna.other))
    assert parts["teacher"] == pytest.approx(vicuna.linear * 2 + vicuna.other * 4)


def test_vicuna_shipped_config_is_llama2_7b(vicuna):
    assert vicuna.params == 6_738_415_616  # Llama-2-7B
    assert (vicuna.layers, vicuna.hidden, vicuna.intermediate, vicuna.heads, vicuna.kv_heads, vicuna.vocab) == \
        (32, 4096, 11008, 32, 32, 32000)
    assert not vicuna.tied and vicuna.max_positions == 4096
    assert vicuna.quantized == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # lm_head kept in 16 bits


def test_paper_recipe_fits_8_x_80_gb(vicuna):
    cfg = load_config(PAPER)
    stages = {s.stage: s for s in pl.plan_run(cfg, vicuna, 80)}
    assert list(stages) == ["quantize", "flips", "pairs", "train", "evaluate", "serve"]
    assert all(s.fits for s in stages.values())
    train = stages["train"]
    assert (train.gpus, train.nodes) == (8, 1) and 20 < train.gpu_gib < 80
    assert stages["pairs"].gpus == 8 and stages["pairs"].gpu_gib == pytest.approx(0.9 * 80)
    # 781 steps of 64 pairs: the time range brackets docs/cluster.md's 30-60 min estimate
    lo, hi = train.time_s
    assert lo < 30 * 60 and hi > 60 * 60


def test_one_gpu_zero2_7b_warns_and_names_the_fix(vicuna):
    cfg = load_config(PAPER, ["train.num_workers=1", "train.zero_stage=2"])
    train = next(s for s in pl.plan_run(cfg, vicuna, 80) if s.stage == "train")
    assert not train.fits and train.gpu_gib > 80 * 1.5  # 20 B/param of model states alone: 125 GiB
    assert any(n.startswith("WARNING train") and "train.zero_stage=3" in n for n in train.notes)


def test_cli_prints_the_table_and_strict_fails_a_run_that_cannot_fit(capsys):
    from qdpo_ray.cli import main

    assert main(["plan", "--config", PAPER]) == 0
    out = capsys.readouterr().out
    for stage in ("quantize", "flips", "pairs", "train", "evaluate", "serve"):
        assert f"\n{stage} " in out
    assert "GiB/GPU" in out and "MFU" in out and "tokens/s per GPU engine" in out and "WARNING" not in out
    args = ["plan", "--config", PAPER, "--train.num_workers=1", "--train.zero_stage=2"]
    assert main(args) == 0  # a warning, not an error, unless --strict
    cap = capsys.readouterr()
    assert "WARNING train" in cap.out and "would not fit" in cap.err
    assert main([*args, "--strict"]) == 1
    assert main(["plan", "--config", PAPER, "--gpu-memory-gib", "160", "--train.num_workers=1",
                 "--train.zero_stage=2", "--strict"]) == 0


def test_model_config_path_and_bad_paths_are_config_errors(tmp_path, capsys):
    from qdpo_ray.cli import main

    (tmp_path / "config.json").write_text(json.dumps(_tiny_config().to_dict()))
    assert main(["plan", "--model", "some-org/unpublished-7b", "--model-config", str(tmp_path / "config.json")]) == 0
    assert "0.000" in capsys.readouterr().out  # the tiny model: ~0.00004 B parameters
    assert main(["plan", "--model-config", str(tmp_path / "missing.json")]) == 2
    assert "--model-config" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        pl.load_model_config("x", str(tmp_path / "bad.json"))
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ConfigError, match="--model-config"):
        pl.load_model_config(str(empty))


def test_pipeline_dry_run_prints_the_resources(tmp_path, capsys):
    from qdpo_ray.cli import main

    assert main(["pipeline", "--config", "configs/default.yaml", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "status" in out and "GiB/GPU" in out and "policy states" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_shipped_embedded_config_matches_the_converted_model(embedded_model_dir):
    from transformers import AutoConfig

    shipped = pl.model_shape(pl.load_model_config("smollm2-135m"))
    assert shipped == pl.model_shape(AutoConfig.from_pretrained(embedded_model_dir))
    assert shipped.params == 134_515_008 and shipped.tied


def test_a_7b_engine_on_a_16_gib_gpu_has_no_kv_room(vicuna):
    cfg = load_config(PAPER)
    pairs = next(s for s in pl.plan_run(cfg, vicuna, 16) if s.stage == "pairs")
    kv = {p.name: p.gib for p in pairs.parts}
    assert kv["fp KV cache"] == pytest.approx(0.9 * 16 - vicuna.params * 2 / GiB - pl.VLLM_OVERHEAD_GIB)
    assert kv["fp KV cache"] < 0 < kv["π_q KV cache"]  # the W4 engine fits, the fp one does not
    assert not pairs.fits and any("tensor_parallel_size" in n for n in pairs.notes)
    ok = next(s for s in pl.plan_run(load_config(PAPER, ["pairs.engine.tensor_parallel_size=2"]), vicuna, 16)
              if s.stage == "pairs")
    assert ok.fits and ok.gpus == 16 and ok.nodes == 2


def test_rounds_and_fractional_engine_gpus(vicuna):
    one = {s.stage: s for s in pl.plan_run(load_config(PAPER), vicuna)}
    two = {s.stage: s for s in pl.plan_run(load_config(PAPER, ["train.rounds=2"]), vicuna)}
    assert two["train"].time_s[0] == pytest.approx(2 * one["train"].time_s[0], rel=0.01)
    assert two["train"].gpu_gib == one["train"].gpu_gib  # rounds take time, not memory
    half = {s.stage: s for s in pl.plan_run(load_config(PAPER, ["pairs.engine.gpus_per_actor=0.5",
                                                                "pairs.engine.gpu_memory_utilization=0.45",
                                                                "serve.engine.gpus_per_actor=1"]), vicuna)}
    assert half["pairs"].gpus == 4 and half["pairs"].gpu_gib == pytest.approx(0.45 * 80)
    assert half["serve"].gpus == 2 and half["serve"].fits


def test_train_disk_is_two_checkpoints_the_final_weights_and_the_export(vicuna):
    cfg = load_config(PAPER)
    train = next(s for s in pl.plan_run(cfg, vicuna) if s.stage == "train")
    per_param = (memory.checkpoint_bytes_per_param(3, "bf16") if hasattr(memory, "checkpoint_bytes_per_param")
                 else memory.FP32 + memory.ADAM_MOMENTS)
    assert per_param == 12  # fp32 partition + Adam moments under ZeRO-3
    export = pl.vllm_weight_bytes(vicuna, True, 4, None, 2)
    assert train.disk_gib * GiB == pytest.approx(2 * 12 * vicuna.params + 4 * vicuna.params + export)
    assert 3.4 * GiB < export < 3.6 * GiB  # docs/cluster.md: the W4A16 export of Vicuna-7B is 3.5 GiB
