"""The paper's shapes end to end on CPU: a Llama at Vicuna-7B's width (hidden 4096, MLP 11008, 32 heads of 128,
multi-head attention) with one decoder layer and random weights, saved in fp16 as Vicuna-7B-v1.5 ships, with the
embedded model's tokenizer.

quantize (per channel and g128) → pairs on real vLLM CPU engines (fidelity-checked in fp32) → training with
DeepSpeed ZeRO-3 in bf16 on two Ray Train workers → the trained W4 export → loaded by transformers and by vLLM.
Kernels choose their paths by shape (vLLM's CPU GEMMs, the packer's group layout, SDPA), so these are the shapes
where a 7B run would fail first; everything else about a 7B run is its depth (32 such layers).
"""

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

WIDTH = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
PROMPTS, TOKENS = 4, 8


@pytest.fixture(scope="module")
def width7b_dir(module_tmp):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdpo_ray.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=1, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **WIDTH)
    model = LlamaForCausalLM(cfg).eval()
    path = module_tmp / "width7b"
    model.half().save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def _cfg(out, model_dir, *extra):
    from qdpo_ray.config import load_config

    return load_config(None, [f"out={out}", f"model.name={model_dir}", *extra])


def _linear_weights(model) -> dict[str, torch.Tensor]:
    from qdpo_ray.quant.fake_quant import quant_targets

    return {n: m.weight.detach().float() for n, m in quant_targets(model, ["Linear"], ["lm_head"])}


@pytest.mark.parametrize("group", ["null", "128"])
def test_rtn_export_at_7b_width_is_the_fake_quant_model(module_tmp, width7b_dir, group):
    """The packed checkpoint, unpacked by compressed-tensors in transformers, holds exactly RTN(fp32 upcast of
    the fp16 weights) on the per-channel and the g128 grid, for the 4096×4096, 11008×4096 and 4096×11008 layers."""
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.export import run_quantize
    from qdpo_ray.quant.fake_quant import quantize_model_rtn

    cfg = _cfg(module_tmp / f"w4-{group}", width7b_dir, f"quant.group_size={group}")
    out = run_quantize(cfg)
    got = _linear_weights(load_model(str(out), dtype="float32"))
    want = _linear_weights(quantize_model_rtn(load_model(cfg.model, dtype="float32"), cfg.quant))
    shapes = {tuple(w.shape) for w in want.values()}
    assert shapes == {(4096, 4096), (11008, 4096), (4096, 11008)}
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def pairs_dir(module_tmp, ray_local, width7b_dir):
    from qdpo_ray.generate.pairs import run_pairs

    out = module_tmp / "pairs"
    summary = run_pairs(_cfg(out, width7b_dir, "prompts.source=builtin:eval", f"prompts.limit={PROMPTS}",
                             f"pairs.max_new_tokens={TOKENS}", "pairs.drop_identical=false",
                             f"pairs.fidelity_sample={PROMPTS}", "pairs.engine.batch_size=4"))
    return out, summary


def test_pairs_from_vllm_engines_at_7b_width_are_the_fp32_greedy_answers(pairs_dir):
    _, s = pairs_dir
    assert s["pairs_kept"] == PROMPTS
    f = s["fidelity"]
    assert f["checked"] > 0, f
    # The engines run fp32 (the dense π_q on every CPU): each answer is its model's fp32 greedy answer.
    assert f["chosen_token_agreement"] == 1.0 and f["rejected_token_agreement"] == 1.0, f


def _answer_logits(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(answer)].float()


# Two ZeRO-3 workers, two reference scorers and two vLLM engines of a 0.4 B-parameter fp32 model: it passes on its
# own on a 24 GiB machine (`QDPO_WIDTH7B_TRAIN=1 pytest tests/test_width7b.py`), but at the end of the full suite
# there the node runs out of memory, so the full suite runs it only when asked.
@pytest.mark.skipif(not os.environ.get("QDPO_WIDTH7B_TRAIN"), reason="set QDPO_WIDTH7B_TRAIN=1 (needs the machine's memory to itself)")
def test_zero3_bf16_training_at_7b_width_exports_a_model_vllm_and_transformers_load(tmp_path, pairs_dir, width7b_dir):
    from qdpo_ray.generate.pairs import load_pairs
    from qdpo_ray.generate.vllm_greedy import run_subprocess
    from qdpo_ray.models import load_model
    from qdpo_ray.train.trainer import run_train

    pairs, _ = pairs_dir
    s = run_train(_cfg(tmp_path, width7b_dir, f"train.pairs={pairs}", "train.zero_stage=3", "train.precision=bf16",
                       "train.num_workers=2", "train.per_device_batch_size=1", "train.max_steps=2",
                       "train.checkpoint_every=2", "train.warmup_steps=0", "train.lr=1e-4"))
    with open(Path(tmp_path) / "metrics.csv") as f:
        import csv

        hist = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    # π_θ starts as π_q in bf16 too: the implicit rewards of the first step are zero.
    assert abs(hist[0]["rewards/chosen"]) < 1e-3 and abs(hist[0]["rewards/rejected"]) < 1e-3, hist[0]
    export = s["export"]
    assert json.loads(Path(export, "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"

    # transformers (compressed-tensors) and vLLM read the same π_θ: vLLM's greedy tokens are transformers'
    # argmax given their prefix, or a near tie of it.
    row = load_pairs(pairs)[0]
    prompt = list(row["prompt_token_ids"])
    got = run_subprocess(export, [prompt], max_tokens=TOKENS, dtype="float32", max_model_len=512)["token_ids"][0]
    assert len(got) == TOKENS
    logits = _answer_logits(load_model(export, dtype="float32"), prompt, got)
    top = logits.max(-1).values
    chosen = logits.gather(-1, torch.tensor(got)[:, None])[:, 0]
    assert torch.all(top - chosen <= 1e-3 * top.abs().clamp(min=1)), (top - chosen).tolist()
