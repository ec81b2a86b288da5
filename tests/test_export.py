"""The packed compressed-tensors export reloads to exactly the fake-quant weights and logits."""

import copy
import json

import pytest
import torch

from qdpo_ray.config import ConfigError, QuantConfig
from qdpo_ray.quant.export import export_packed
from qdpo_ray.quant.fake_quant import from_fake_quant, quantize_model_rtn, to_fake_quant


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4), QuantConfig(bits=4, group_size=32),
                                 QuantConfig(bits=4, symmetric=True), QuantConfig(bits=8)],
                         ids=lambda c: c.label)
def test_export_reloads_to_fake_quant_weights(tiny_llama, tmp_path, cfg):
    from transformers import AutoModelForCausalLM

    rtn = quantize_model_rtn(copy.deepcopy(tiny_llama), cfg)
    out = export_packed(to_fake_quant(copy.deepcopy(tiny_llama), cfg), None, cfg, tmp_path / "w",
                        storage_dtype=torch.float32)
    conf = json.loads((out / "config.json").read_text())
    qc = conf["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"]) == (cfg.bits, cfg.group_size, cfg.symmetric)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))

    # The file really holds packed ints: 8 int4 values per int32.
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
    assert packed.dtype == torch.int32 and packed.shape[1] * (32 // cfg.bits) == 512

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, rtn(ids).logits)
    for name, p in rtn.named_parameters():
        if name.endswith("proj.weight"):
            mod = loaded.get_submodule(name.rsplit(".", 1)[0])
            assert torch.equal(_dequantized_weight(mod), p.data), name


def _dequantized_weight(module):
    """Unpack the module's int32-packed weight with compressed-tensors' own decompressor."""
    from compressed_tensors.compressors.base import decompress_module

    # transformers decompresses lazily on the first forward; otherwise unpack here.
    if hasattr(module, "weight_packed"):
        decompress_module(module)
    return module.weight.data


def test_export_refuses_unpackable_bits(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=r"quant.bits=3: .* supports \(4, 8\)"):
        export_packed(tiny_llama, None, QuantConfig(bits=3), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_export_is_atomic_on_failure(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "w"
    export_packed(copy.deepcopy(tiny_llama), None, QuantConfig(bits=4), out, storage_dtype=torch.float32)
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", boom)
    with pytest.raises(RuntimeError):
        export_packed(copy.deepcopy(tiny_llama), None, QuantConfig(bits=4), out)
    assert sorted(p.name for p in out.iterdir()) == before  # old export intact, no partial dir left
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


def test_load_model_unpacks_once_and_matches(tiny_llama, tmp_path):
    from qdpo_ray.models import load_model

    cfg = QuantConfig(bits=4, group_size=32)
    rtn = quantize_model_rtn(copy.deepcopy(tiny_llama), cfg)
    out = export_packed(copy.deepcopy(tiny_llama), None, cfg, tmp_path / "w", storage_dtype=torch.float32)
    m = load_model(str(out))
    assert not any(hasattr(mod, "weight_packed") for mod in m.modules())
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, rtn(ids).logits)


def test_frozen_grid_training_exports_what_training_computed(tiny_llama, tmp_path):
    """`quant.freeze_qparams`: training quantizes on the step-0 grid; the export must pack on it too
    (recomputed min-max scales of the trained weights would be another model)."""
    from transformers import AutoModelForCausalLM

    cfg = QuantConfig(bits=4, freeze_qparams=True)
    policy = to_fake_quant(copy.deepcopy(tiny_llama), cfg)
    with torch.no_grad():  # "training" that moves the channels' min/max: the frozen grid now clips
        for name, p in policy.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(1.3).add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        trained = policy(ids).logits
        recomputed = to_fake_quant(from_fake_quant(copy.deepcopy(policy)), QuantConfig(bits=4))(ids).logits
    assert not torch.allclose(trained, recomputed, atol=1e-3)  # the two grids really differ here
    out = export_packed(policy, None, cfg, tmp_path / "w", storage_dtype=torch.float32)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.allclose(exported, trained, atol=1e-5, rtol=0)


def test_trained_export_is_fp32_but_announces_a_16_bit_serving_dtype(tiny_llama, tmp_path):
    cfg = QuantConfig(bits=4)
    out = export_packed(to_fake_quant(copy.deepcopy(tiny_llama), cfg), None, cfg, tmp_path / "w",
                        storage_dtype=torch.float32)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
