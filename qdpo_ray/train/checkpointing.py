"""Selective activation checkpointing of the decoder layers: keep matmul and attention outputs, recompute
the rest.

Each decoder layer runs under `torch.utils.checkpoint` (non-reentrant) with a selective policy
(`create_selective_checkpoint_contexts`): the outputs of matrix multiplications and of the attention
kernel are stored in forward; everything else — RMSNorm, RoPE, SiLU·up, residual adds, the K/V head
repeat, the layout copies and the STE fake-quantization of the weights — is recomputed in backward from
those and the layer input. Only element-wise work is done twice (unlike full checkpointing, no matmul
is), while a layer keeps about half of the activations autograd would save (for the 135M default at
2k tokens: ~47 MB instead of ~100 MB per layer, plus the 14 MB of fake-quantized weights autograd would
keep per layer). The maths is unchanged: the recomputed values are bit-identical.
"""

from __future__ import annotations

import functools

import torch

_SAVE_OPS = None


def _save_ops():
    global _SAVE_OPS
    if _SAVE_OPS is None:
        aten = torch.ops.aten
        names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward"]
        _SAVE_OPS = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    return _SAVE_OPS


# A matmul whose inner dimension is at most this is cheap to recompute next to its output's size: the
# LoRA up-projection B (rank r → out_features) would otherwise store an output as large as the base
# layer's for r/in_features of its FLOPs.
SMALL_INNER_DIM = 256


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op not in _save_ops():
        return CheckpointPolicy.PREFER_RECOMPUTE
    aten = torch.ops.aten
    a = args[0] if op is aten.mm.default else args[1] if op is aten.addmm.default else None
    if a is not None and a.shape[-1] <= SMALL_INNER_DIM:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def selective_checkpoint_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy)


def enable_selective_checkpointing(model) -> bool:
    """Checkpoint every decoder layer of a HF model selectively (active in train mode); False when the model
    has no gradient-checkpointing support (then nothing changes)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": functools.partial(selective_checkpoint_context)})
    return True


# ---- ZeRO-3 with frozen parameters ------------------------------------------------------------------
# Non-reentrant checkpointing (what `enable_selective_checkpointing` uses) inside a ZeRO-3 engine that
# holds frozen parameters — LoRA's frozen base — fails in backward with torch's "Recomputed values ...
# have different metadata" (saved shape [n], recomputed [0]) in DeepSpeed releases before 0.19.3: the
# recompute's forward hooks re-partition the frozen parameters in place while torch's checkpoint still
# holds them undetached. DeepSpeed 0.19.3 ("Z3: Support for activation ckpt with frozen params") keeps
# them gathered until the recompute's backward releases them.
FROZEN_RECOMPUTE_DEEPSPEED = "0.19.3"


def deepspeed_recomputes_frozen_params(version: str) -> bool:
    """Whether DeepSpeed `version` runs non-reentrant activation checkpointing over frozen ZeRO-3 parameters."""
    from packaging.version import Version

    return Version(version) >= Version(FROZEN_RECOMPUTE_DEEPSPEED)


def check_frozen_recompute(lora: bool, zero_stage: int, deepspeed_version: str) -> None:
    """Refuse LoRA under ZeRO-3 with a DeepSpeed that would crash in its first backward."""
    from qdpo_ray.config import ConfigError

    if lora and zero_stage == 3 and not deepspeed_recomputes_frozen_params(deepspeed_version):
        raise ConfigError(
            f"train.lora.enabled=true with train.zero_stage=3 needs DeepSpeed >= {FROZEN_RECOMPUTE_DEEPSPEED} "
            f"(installed: {deepspeed_version}): older releases break the activation checkpointing of the frozen "
            f"base in backward. Upgrade it (pip install 'deepspeed>={FROZEN_RECOMPUTE_DEEPSPEED}') or set "
            "train.zero_stage=2 (LoRA's optimizer state is small; ZeRO-2 partitions it as well)")
