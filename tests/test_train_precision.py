"""`train.precision=bf16` trains π_q itself: fp32 parameters under bf16 autocast (train/precision.py).

The fake-quant rounds the fp32 weights quantize and the export round, so step-0 codes are π_q's; the frozen
grids stay fp32; the teacher and the reference hold bf16 Linear weights and forward as the policy does.
"""

import copy

import pytest
import torch

from qdpo_ray.config import QuantConfig, TrainConfig, load_config
from qdpo_ray.quant.fake_quant import FakeQuantLinear, quant_targets, to_fake_quant
from qdpo_ray.quant.rtn import QuantSpec, compute_qparams, quantize
from qdpo_ray.train.precision import compute_context, frozen_for_compute


def _codes(model, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    spec = QuantSpec.from_config(cfg)
    out = {}
    for name, m in quant_targets(model, cfg.targets, cfg.ignore):
        w = m.weight.detach().float()
        scale, zero = compute_qparams(w, spec) if getattr(m, "frozen_scale", None) is None else (m.frozen_scale, m.frozen_zero)
        out[name] = quantize(w, scale, zero, spec)
    return out


def test_a_bf16_cast_of_the_weights_moves_4_bit_codes(tiny_llama):
    """The defect a bf16 module cast would bring: π_q of the bf16-cast weights is another model."""
    cfg = QuantConfig(bits=4, group_size=128)
    fp32 = _codes(tiny_llama, cfg)
    cast = _codes(copy.deepcopy(tiny_llama).to(torch.bfloat16), cfg)
    moved = sum(int((fp32[k] != cast[k]).sum()) for k in fp32) / sum(v.numel() for v in fp32.values())
    assert moved > 1e-3  # measured ~1 % on this model


def test_frozen_grid_stays_fp32_under_a_dtype_cast(tiny_llama):
    """`freeze_qparams` grids are fp32 buffers whatever the module is cast to; device moves still apply."""
    model = to_fake_quant(tiny_llama, QuantConfig(bits=4, group_size=128, freeze_qparams=True))
    fq = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    grids = [(m.frozen_scale.clone(), m.frozen_zero.clone()) for m in fq]
    model.to(torch.bfloat16).to("cpu")
    for m, (s, z) in zip(fq, grids):
        assert m.weight.dtype == torch.bfloat16
        assert m.frozen_scale.dtype == m.frozen_zero.dtype == torch.float32
        assert torch.equal(m.frozen_scale, s) and torch.equal(m.frozen_zero, z)


def test_frozen_for_compute_casts_linears_only_and_keeps_a_tied_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = frozen_for_compute(LlamaForCausalLM(cfg).float(), "bf16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == dtypes["model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert all(p.dtype == torch.float32 for p in frozen_for_compute(LlamaForCausalLM(cfg).float(), "fp32").parameters())


def _rows(n: int, seed: int = 1, vocab: int = 500) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()

    return [{"prompt_token_ids": r(2, 9), "chosen_token_ids": r(2, 7), "rejected_token_ids": r(2, 7)} for _ in range(n)]


@pytest.mark.parametrize("group_size", [None, 128])
def test_bf16_step0_is_pi_q_rewards_zero(tiny_model_dir, group_size):
    """Under bf16 the policy (fp32 fake-quant, train mode, selective checkpointing) and the in-place
    reference (bf16 Q(W) Linears) run the same forward: on the batch the reference scored, step-0 rewards
    are exactly 0; the policy's codes are those of quantizing the fp32 checkpoint."""
    from qdpo_ray.models import load_model
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.reference import add_reference_logps, load_reference
    from qdpo_ray.train.steps import preference_micro_step
    from qdpo_ray.train.worker import build_policy

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "train.precision=bf16",
                             f"quant.group_size={'null' if group_size is None else group_size}"])
    reference = load_reference(cfg)
    linears = dict(quant_targets(reference, cfg.quant.targets, cfg.quant.ignore))
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears.values())
    assert reference.model.embed_tokens.weight.dtype == reference.model.norm.weight.dtype == torch.float32

    policy = build_policy(cfg).train()
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    want = _codes(load_model(cfg.model, dtype="float32"), cfg.quant)
    got = _codes(policy, cfg.quant)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    rows = _rows(4)
    scored = add_reference_logps(reference, rows, batch_size=4, precision="bf16")
    t = TrainConfig(precision="bf16")
    with compute_context("bf16", "cpu"):
        loss, vals = preference_micro_step(policy, collate_shared(scored), t)
    assert vals[1] == 0.0 and vals[2] == 0.0 and loss.item() == pytest.approx(0.6931471805599453, abs=1e-12)
    loss.backward()  # backward outside autocast reaches the fp32 masters
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
