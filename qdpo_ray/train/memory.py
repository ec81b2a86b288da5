"""Bytes per parameter of each model a training worker holds — a torch-free table of what
`worker.train_loop` keeps resident (docs/training.md, "Memory").

Roles:
- `policy`: π_θ under DeepSpeed ZeRO with AdamW. Its parameters are fp32 masters in every precision
  (`train.precision=bf16` runs the forward under bf16 autocast instead of casting the module), so the
  fake-quant rounds exactly the weights π_q was made from. Per parameter: the fp32 weight 4 B, its fp32
  gradient 4 B, Adam's two moments 8 B. ZeRO-3 partitions all three over the N data-parallel ranks and
  uses the fp32 partition itself as the optimizer's master (no copy); ZeRO-2 keeps the full weight on
  every rank and partitions the gradient, the moments and the optimizer's fp32 copy of its partition.
  With `train.offload` the gradient partition, the moments and the optimizer's fp32 copy live in host
  memory instead; the device keeps the weight.
- `teacher`: the frozen fp model of the KD terms, one unpartitioned copy per rank.
- `reference`: the frozen π_q of the token-level objectives (`qdpo_flips*`), plain Linears holding Q(W),
  one unpartitioned copy per rank. (Sequence-level objectives score π_ref before training and hold no
  reference model while training.)

Frozen models store every Linear weight in the compute dtype (2 B under bf16: autocast would cast it to
bf16 for the matmul anyway) and keep the other parameters — embeddings, norms — in fp32 as the policy has
them (`kind="other"`), so their forward equals the policy's step-0 forward. Activations, the ZeRO
communication buckets and the allocator's slack come on top.
"""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16")
ROLES = ("policy", "teacher", "reference")
KINDS = ("linear", "other")  # a Linear weight (what the forward's matmuls read), or any other parameter

FP32, BF16 = 4, 2
ADAM_MOMENTS = 8  # exp_avg + exp_avg_sq, fp32


def policy_bytes(zero_stage: int, world: int = 1, offload: bool = False) -> tuple[float, float]:
    """(device, host) bytes per parameter of π_θ on one of `world` ranks under ZeRO `zero_stage`; the
    same in fp32 and bf16 (fp32 masters, bf16 autocast)."""
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, not {zero_stage}")
    if world < 1:
        raise ValueError(f"world must be ≥ 1, not {world}")
    weight = FP32 if zero_stage == 2 else FP32 / world
    grad = FP32 / world
    master_copy = FP32 / world if zero_stage == 2 or offload else 0.0  # ZeRO-3 steps its fp32 partition in place
    moments = ADAM_MOMENTS / world
    if offload:
        return weight, grad + master_copy + moments
    return weight + grad + master_copy + moments, 0.0


def bytes_per_param(precision: str, role: str, zero_stage: int = 3, world: int = 1, kind: str = "linear",
                    offload: bool = False) -> float:
    """Resident device bytes per parameter of `role` on one of `world` ranks.

    `kind` matters for the frozen roles only: their Linear weights are in the compute dtype, every other
    parameter fp32. Host bytes of an offloaded optimizer: `policy_bytes(...)[1]`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if role == "policy":
        return policy_bytes(zero_stage, world, offload)[0]
    return BF16 if precision == "bf16" and kind == "linear" else FP32


def model_bytes(precision: str, role: str, linear_params: int, other_params: int, zero_stage: int = 3,
                world: int = 1, offload: bool = False) -> float:
    """Resident device bytes of `role` for a model of `linear_params` Linear weights (lm_head included
    unless tied) and `other_params` other parameters (embeddings, norms)."""
    return (linear_params * bytes_per_param(precision, role, zero_stage, world, "linear", offload)
            + other_params * bytes_per_param(precision, role, zero_stage, world, "other", offload))


# ---- checkpoints ------------------------------------------------------------------------------------
# What `engine.save_checkpoint` writes, summed over all ranks (measured with DeepSpeed 0.19.8): the
# optimizer files hold every trainable parameter's fp32 master (ZeRO-3: the partition itself; ZeRO-2:
# the optimizer's fp32 copy) and its two Adam moments, 12 B; ZeRO-2 also writes the full module state
# once (4 B for every parameter, frozen ones included), ZeRO-3 only the frozen parameters' fp32
# fragments (4 B each). The same under bf16: the module keeps fp32 masters.
TRAINABLE_CHECKPOINT = FP32 + ADAM_MOMENTS


def checkpoint_bytes(zero_stage: int, params: int, trainable: int | None = None) -> float:
    """Bytes of one DeepSpeed checkpoint of a model of `params` parameters, `trainable` of them trained
    (None: all), summed over the ranks; independent of the number of ranks."""
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, not {zero_stage}")
    trainable = params if trainable is None else trainable
    if not 0 <= trainable <= params:
        raise ValueError(f"trainable ({trainable}) must be between 0 and params ({params})")
    module = FP32 * params if zero_stage == 2 else FP32 * (params - trainable)
    return module + TRAINABLE_CHECKPOINT * trainable


def checkpoint_bytes_per_param(zero_stage: int, precision: str = "fp32", lora: bool = False) -> float:
    """Checkpoint bytes per model parameter: full training 16 (ZeRO-2) or 12 (ZeRO-3); with LoRA the
    frozen base's 4 (its adapters, r·(in + out) per adapted Linear, add 12 B each: `checkpoint_bytes`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    return checkpoint_bytes(zero_stage, 1, 0 if lora else 1)
