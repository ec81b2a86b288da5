"""Training precision: a compute dtype, never a storage dtype of π_θ.

π_θ's parameters are fp32 in every `train.precision`. Under `bf16` the forward of π_θ and of the frozen
models runs under bf16 autocast (DeepSpeed's `bf16` mode stays off: it would cast the module, and its fp32
masters would be made from the bf16 cast). So the fake-quant rounds the same fp32 weights that quantize,
the vLLM engines and evaluation round — at step 0 π_θ has π_q's codes exactly — the frozen quantization
grids stay fp32, and the final policy is the fp32 masters. The matmuls run in bf16 all the same.

DeepSpeed's own `torch_autocast` section is not used: it marks Linear parameters for bf16 communication,
so ZeRO-3 would gather bf16 casts of the weights and the fake-quant would round those.

Frozen models (the KD teacher, the token-level objectives' reference) hold every Linear weight in the
compute dtype — what autocast casts it to for the matmul anyway, at half the memory — and every other
parameter (embeddings, norms, a tied lm_head) in fp32 as the policy has them, so their forward under
`compute_context` equals the policy's (bytes per parameter: `train.memory`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_context(precision: str, device) -> contextlib.AbstractContextManager:
    """The context every forward of training and reference scoring runs in (backward runs outside it)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=COMPUTE_DTYPES[precision])


@torch.no_grad()
def frozen_for_compute(model: nn.Module, precision: str) -> nn.Module:
    """A frozen model (in place): no gradients, eval mode, Linear weights and biases in the compute dtype,
    every other parameter as it is. A Linear weight shared with another module (a tied lm_head is the
    embedding) keeps its dtype, so the embedding's output stays what the policy's is."""
    dtype = COMPUTE_DTYPES[precision]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    owned_elsewhere = {id(p) for m in model.modules() if not isinstance(m, nn.Linear)
                       for p in m.parameters(recurse=False)}
    for m in linears:
        for p in (m.weight, m.bias):
            if p is not None and id(p) not in owned_elsewhere:
                p.data = p.data.to(dtype)
    return model.requires_grad_(False).eval()
