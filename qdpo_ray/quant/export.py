"""Export to a real low-bit checkpoint: compressed-tensors `pack-quantized` (W4A16 / W8A16).

The directory is a standard Hugging Face model directory whose config.json carries a compressed-tensors
`quantization_config`; vLLM serves it with its WNA16 kernels and transformers loads it too. We compute
scales and zero points with our own RTN (`rtn.compute_qparams`) and let compressed-tensors do the
rounding and int32 packing — its rounding convention is the one `rtn.py` follows, so the packed integers
equal the fake-quant integers.

dtypes: scales stay fp32 (tiny; dequantized weights then equal the fp32 fake-quant weights exactly),
the rest (embeddings, norms, lm_head) is stored in `storage_dtype`: the source checkpoint's dtype for an
RTN export (fp32 for the embedded default), fp32 for a trained export (its master weights, lossless).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from qdpo_ray.config import ConfigError, QuantConfig
from qdpo_ray.io import atomic_dir
from qdpo_ray.quant.fake_quant import FakeQuantLinear, check_group_size, from_fake_quant, quant_targets
from qdpo_ray.quant.rtn import QuantSpec, compute_qparams

log = logging.getLogger(__name__)

PACKABLE_BITS = (4, 8)  # what pack-quantized + vLLM's WNA16 kernels accept


def require_packable(bits: int, field: str = "quant.bits", needs: str = "exporting writes",
                     hint: str = "other bit widths are available as fake-quant/RTN models for analysis "
                                 "(`qdpo-ray flips`) but cannot be exported") -> None:
    """Refuse a bit width the packed checkpoint cannot hold, before anything is loaded or trained.

    `needs` (a verb phrase: "`qdpo-ray quantize` writes") says what asked for the checkpoint and `hint`
    how to get on without one; the rest of the message is the same wherever the check runs.
    """
    if bits not in PACKABLE_BITS:
        raise ConfigError(f"{field}={bits}: {needs} a packed checkpoint (compressed-tensors pack-quantized, "
                          f"served by vLLM), which supports {PACKABLE_BITS} bits only; {hint}")


def _serve_dtype(storage: torch.dtype, serve: torch.dtype | None) -> torch.dtype:
    """config.json's `dtype`: what engines run it in. W4A16 kernels compute in 16 bits; an fp32-stored
    checkpoint (a trained export, lossless) is announced as fp16, which tracks the fp32 π_q on CPU and
    GPU (docs/results.md), unless a 16-bit dtype is asked for."""
    dt = serve or storage
    return torch.float16 if dt == torch.float32 else dt


def compressed_tensors_config(cfg: QuantConfig):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(
        num_bits=cfg.bits,
        type="int",
        symmetric=cfg.symmetric,
        strategy="group" if cfg.group_size else "channel",
        group_size=cfg.group_size,
        observer="minmax",
    )
    scheme = QuantizationScheme(targets=list(cfg.targets), weights=args)
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(cfg.ignore),
                              format="pack-quantized", quantization_status="frozen")


@torch.no_grad()
def export_packed(model: nn.Module, tokenizer, cfg: QuantConfig, out: str | Path,
                  storage_dtype: torch.dtype | None = None, extra_readme: str = "",
                  serve_dtype: torch.dtype | None = None) -> Path:
    """Write `model` (plain or fake-quant, full-precision master weights) as a packed W{bits} dir.

    `model` is modified in place (it ends up compressed); pass a copy if you need it afterwards.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    require_packable(cfg.bits)
    check_group_size(model, cfg)
    # A FakeQuantLinear trained with frozen qparams computed on the step-0 grid: pack on that grid, or
    # the checkpoint would not be the model training's forward computed.
    frozen = {name: (m.frozen_scale, m.frozen_zero) for name, m in model.named_modules()
              if isinstance(m, FakeQuantLinear) and m.frozen_scale is not None}
    model = from_fake_quant(model)
    storage_dtype = storage_dtype or getattr(model.config, "dtype", None) or torch.bfloat16
    if isinstance(storage_dtype, str):
        storage_dtype = getattr(torch, storage_dtype)
    model.float()

    spec = QuantSpec.from_config(cfg)
    qcfg = compressed_tensors_config(cfg)
    names = [n for n, _ in quant_targets(model, cfg.targets, cfg.ignore)]
    apply_quantization_config(model, qcfg)
    for name in names:
        module = model.get_submodule(name)
        scale, zero = frozen[name] if name in frozen else compute_qparams(module.weight, spec)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype)

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and pname != "weight_scale":
                p.data = p.data.to(storage_dtype)

    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        compressor.update_config(str(tmp))
        # save_pretrained records fp32 (the scales' dtype); serving engines read this field to pick
        # the activation dtype, and vLLM's WNA16 CPU kernel needs bf16/fp16.
        cfg_path = tmp / "config.json"
        cfg_json = json.loads(cfg_path.read_text())
        cfg_json["dtype"] = str(_serve_dtype(storage_dtype, serve_dtype)).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg_json, indent=2) + "\n")
        if tokenizer is not None:  # with the chat template models.load_tokenizer resolved: vLLM and transformers
            tokenizer.save_pretrained(tmp)  # read the same prompt format from here (chat_template.jinja)
        meta = {"quant": cfg.model_dump(mode="json"), "label": cfg.label, "format": "pack-quantized",
                "quantized_layers": len(names)}
        (tmp / "qdpo_quant.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# {cfg.label} RTN checkpoint (compressed-tensors pack-quantized)\n\n"
            f"Written by qdpo-ray. {len(names)} Linear layers quantized to {cfg.bits} bits, "
            f"{'group size ' + str(cfg.group_size) if cfg.group_size else 'one scale per output channel'}, "
            f"{'symmetric' if cfg.symmetric else 'asymmetric'} min-max round-to-nearest; "
            f"ignored: {', '.join(cfg.ignore) or 'none'}.\n\n"
            "Serve with `qdpo-ray serve --w4 <this dir>` or `vllm serve <this dir> --dtype float16` (on a CPU "
            "vLLM's W4A16 kernel needs AVX-512, and `VLLM_CPU_INT4_W4A8=0` keeps activations in 16 bits), or load with "
            "`transformers.AutoModelForCausalLM.from_pretrained(<this dir>)`.\n" + extra_readme
        )
    log.info("wrote %s checkpoint to %s", cfg.label, out)
    return out


def run_quantize(cfg) -> Path:
    """`qdpo-ray quantize`: load the fp model of `cfg.model`, RTN-quantize with `cfg.quant`, write `cfg.out`."""
    from qdpo_ray.config import dump_config
    from qdpo_ray.models import checkpoint_dtype, load_model, load_tokenizer

    require_packable(cfg.quant.bits, needs="`qdpo-ray quantize` writes")  # before loading the model
    model = load_model(cfg.model, dtype="float32")
    tok = load_tokenizer(cfg.model)
    out = export_packed(model, tok, cfg.quant, cfg.out, storage_dtype=checkpoint_dtype(cfg.model),
                        extra_readme=f"\nSource model: `{cfg.model.name}`.\n")
    dump_config(cfg, Path(out) / "qdpo_config.yaml")
    return out


def is_quantized_dir(path: str | Path) -> bool:
    """Whether `path` is a model directory whose config.json carries a quantization_config."""
    cfg_file = Path(path) / "config.json"
    return cfg_file.is_file() and "quantization_config" in json.loads(cfg_file.read_text())


def check_quantized_dir(path: str, field: str) -> str:
    """A ready quantized checkpoint given by the user; `field` names the config field in the error."""
    p = Path(path)
    if not is_quantized_dir(p):
        raise ConfigError(f"{field}={path!r} is not a quantized checkpoint directory (config.json with "
                          "quantization_config); make one with `qdpo-ray quantize` or `qdpo-ray train`")
    return str(p)


def ensure_rtn_checkpoint(cfg, target: str | Path) -> str:
    """RTN-export `cfg.model` with `cfg.quant` into `target` unless the same export is already there."""
    import yaml

    target = Path(target)
    meta, written = target / "qdpo_quant.json", target / "qdpo_config.yaml"
    if meta.is_file() and written.is_file():
        same_quant = json.loads(meta.read_text()).get("quant") == cfg.quant.model_dump(mode="json")
        same_model = (yaml.safe_load(written.read_text()) or {}).get("model") == cfg.model.model_dump(mode="json")
        if same_quant and same_model:
            return str(target)
    return str(run_quantize(cfg.model_copy(update={"out": str(target)})))
