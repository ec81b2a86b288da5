"""The trained policy → a packed W{bits} checkpoint (and the LoRA adapter), exactly as trained.

Three things make the export equal the model that training's forward computed:
- the quantization grid: with `quant.freeze_qparams` training used the step-0 scales and zero points,
  so the export packs the trained weights on that grid (`export_packed` reads the frozen grid off the
  FakeQuantLinears), not on min-max scales recomputed from the trained weights;
- the unquantized tensors (embeddings, norms, lm_head) were trained in fp32 and are stored in fp32;
- LoRA: BA is merged into Q(W), the base the adapters were trained against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qdpo_ray.config import RunConfig


def export_name(cfg: RunConfig) -> str:
    t = cfg.train
    return f"w{cfg.quant.bits}-{t.objective.replace('+', '-')}{'-lora' if t.lora.enabled else ''}"


def export_trained(cfg: RunConfig, weights: dict[str, torch.Tensor], out: Path, tok,
                   init_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Load the trained master weights into π_θ, count parameters, export (and save the LoRA adapter)."""
    from qdpo_ray.models import checkpoint_dtype
    from qdpo_ray.quant.export import export_packed
    from qdpo_ray.train.worker import build_policy, load_weights

    model = build_policy(cfg, init_weights)  # the grid of the run's starting point, as in training
    load_weights(model, weights)
    info = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}
    if cfg.train.lora.enabled:
        adapter = out / "lora-adapter"
        model.save_pretrained(str(adapter))
        info["adapter"] = str(adapter)
        model = model.merge_and_unload()  # Q(W) + BA (build_policy's base is Q(W)), then quantized below
    if cfg.train.export:
        target = out / export_name(cfg)
        export_packed(model, tok, cfg.quant, target, storage_dtype=torch.float32,
                      serve_dtype=checkpoint_dtype(cfg.model),
                      extra_readme=f"\nTrained with qdpo-ray `{cfg.train.objective}` from `{cfg.model.name}`.\n")
        info["export"] = str(target)
    return info
