"""FakeQuantLinear: exact π_q forward, straight-through gradients, frozen qparams, model swaps."""

import copy

import pytest
import torch
from torch import nn

from qdpo_ray.config import ConfigError, QuantConfig
from qdpo_ray.quant.fake_quant import FakeQuantLinear, from_fake_quant, quantize_model_rtn, to_fake_quant
from qdpo_ray.quant.rtn import QuantSpec, fake_quantize


def test_ste_gradient_is_identity_on_master_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    fq = FakeQuantLinear.from_linear(lin, QuantSpec(bits=3))
    x = torch.randn(5, 64)
    g_out = torch.randn(5, 32)
    fq(x).backward(g_out)
    # y = x Ŵᵀ + b with dŴ/dW := I  ⇒  dL/dW = g_outᵀ x, the gradient a plain Linear with weight Ŵ gets.
    ref = nn.Linear(64, 32)
    ref.weight.data = fake_quantize(lin.weight.data, QuantSpec(bits=3))
    ref.bias.data = lin.bias.data.clone()
    ref(x).backward(g_out)
    assert torch.allclose(fq.weight.grad, ref.weight.grad, atol=1e-6)
    assert torch.allclose(fq.weight.grad, g_out.T @ x, atol=1e-5)
    assert fq.weight is lin.weight  # the master weight is the original Parameter


def test_fake_quant_logits_equal_rtn_model(tiny_llama):
    cfg = QuantConfig(bits=4)
    rtn = quantize_model_rtn(copy.deepcopy(tiny_llama), cfg)
    fq = to_fake_quant(copy.deepcopy(tiny_llama), cfg)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert torch.equal(rtn(ids).logits, fq(ids).logits)
    # ... also with grad enabled (the training path, not the inference cache)
    assert torch.equal(rtn(ids).logits, fq(ids).logits)
    n = sum(isinstance(m, FakeQuantLinear) for m in fq.modules())
    assert n == 2 * 7  # q,k,v,o,gate,up,down per layer; lm_head ignored
    assert not isinstance(fq.lm_head, FakeQuantLinear)


def test_state_dict_keys_unchanged_and_round_trip(tiny_llama):
    keys = list(tiny_llama.state_dict())
    fq = to_fake_quant(copy.deepcopy(tiny_llama), QuantConfig(bits=4, freeze_qparams=True))
    assert list(fq.state_dict()) == keys
    back = from_fake_quant(fq)
    assert not any(isinstance(m, FakeQuantLinear) for m in back.modules())
    for k, v in back.state_dict().items():
        assert torch.equal(v, tiny_llama.state_dict()[k])


def test_recomputed_vs_frozen_qparams_after_update():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    live = FakeQuantLinear.from_linear(copy.deepcopy(lin), QuantSpec(bits=4))
    frozen = FakeQuantLinear.from_linear(copy.deepcopy(lin), QuantSpec(bits=4), freeze_qparams=True)
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = live(x).clone()
        for m in (live, frozen):
            m.weight.mul_(3.0)  # in-place update, as an optimizer step does
        after_live, after_frozen = live(x), frozen(x)
    assert not torch.equal(before, after_live)  # inference cache follows the weight version
    expected_live = x @ fake_quantize(live.weight, QuantSpec(bits=4)).T
    assert torch.allclose(after_live, expected_live, atol=1e-5)
    # Frozen qparams come from the 3x smaller weight, so most values clip to the old grid's ends.
    spec = QuantSpec(bits=4)
    expected_frozen = x @ fake_quantize(frozen.weight, spec, frozen.frozen_scale, frozen.frozen_zero).T
    assert torch.allclose(after_frozen, expected_frozen, atol=1e-5)
    assert not torch.allclose(after_frozen, after_live, atol=1e-3)
    grid_max = ((spec.q_max - frozen.frozen_zero) * frozen.frozen_scale).squeeze(1)
    assert torch.allclose(frozen.quantized_weight().amax(1), grid_max, atol=1e-6)


def test_unquantized_bits16_is_identity(tiny_llama):
    ids = torch.randint(0, 512, (1, 10))
    ref = tiny_llama(ids).logits
    assert torch.equal(to_fake_quant(copy.deepcopy(tiny_llama), QuantConfig(bits=16))(ids).logits, ref)


def test_bad_group_size_names_field(tiny_llama):
    with pytest.raises(ConfigError, match=r"quant.group_size=96 .* use one of \[32, 64, 128, 256\]"):
        to_fake_quant(tiny_llama, QuantConfig(bits=4, group_size=96))
