"""π_q as a dense checkpoint: every packed Linear of a W4/W8 checkpoint de-quantized to floats.

vLLM's CPU W4A16 kernel (`cpu_gemm_wna16`) exists only in its AVX-512 builds; on an AVX2-only x86 CPU a
packed checkpoint loads and then fails at its first forward. The dense copy holds exactly the values the
packed checkpoint decodes to, `(q - zero_point) * scale`, stored in fp32, so an engine that runs it in
fp16 computes π_q up to fp16 rounding, as the packed kernel does. It costs 4 bytes a weight on disk and
the dense matmul speed: a fallback for CPUs without the kernel, not a format to ship.

The copy is named by a digest of the packed checkpoint, so a retrained or re-quantized checkpoint never
reuses a stale copy, and it is written atomically (readers see a complete directory or none).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MARKER = "qdpo_dense.json"


def checkpoint_digest(w4_dir: str | Path) -> str:
    """sha256 over config.json and the safetensors files of a checkpoint directory."""
    h = hashlib.sha256()
    root = Path(w4_dir)
    for f in [root / "config.json", *sorted(root.glob("*.safetensors"))]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def ensure_dense_copy(w4_dir: str | Path, root: str | Path) -> str:
    """`root/pi_q-dense-<digest>`: the de-quantized copy of the packed checkpoint `w4_dir`, made once."""
    from qdpo_ray.io import atomic_dir
    from qdpo_ray.models import load_model, load_tokenizer

    digest = checkpoint_digest(w4_dir)
    target = Path(root) / f"pi_q-dense-{digest[:16]}"
    if (target / MARKER).is_file():
        return str(target)
    model = load_model(str(w4_dir), dtype="float32")  # unpacks every packed Linear (models.decompress)
    for module in model.modules():  # plain Linear layers from here on: no quantization state in the copy
        for name in [n for n, _ in module.named_parameters(recurse=False)] + \
                [n for n, _ in module.named_buffers(recurse=False)]:
            if name.startswith("weight_"):  # weight_scale, weight_zero_point, weight_shape, weight_g_idx
                delattr(module, name)
        for attr in ("quantization_scheme", "quantization_status", "quantization_enabled"):
            if hasattr(module, attr):
                delattr(module, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if (Path(w4_dir) / "tokenizer_config.json").is_file():
            load_tokenizer(str(w4_dir)).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(Path(w4_dir).resolve()), "sha256": digest,
                                              "dtype": "float32"}, indent=2) + "\n")
    return str(target)
