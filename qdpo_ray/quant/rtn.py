"""Round-to-nearest (RTN) uniform min-max weight quantization — the maths, as pure tensor functions.

One rounding convention everywhere, the one compressed-tensors uses when it packs a checkpoint, so
that fake-quant during training, the RTN model π_q and the exported 4-bit file hold the same integers:

    q     = clamp(round(w / s + z), q_min, q_max)        (round half to even, torch.round)
    w_hat = (q - z) * s

with signed integers q in [-2^(b-1), 2^(b-1) - 1]. For each output channel (or each group of
`group_size` input columns of it):

    asymmetric:  s = (max - min) / (2^b - 1),  z = round(q_min - min / s)   (integer zero point)
    symmetric:   s = max|w| / (2^(b-1) - 1),   z = 0

where min is clamped to ≤ 0 and max to ≥ 0 so that 0.0 stays exactly representable (the convention of
vLLM/compressed-tensors; per channel of a real LLM min < 0 < max anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """What the quantizer needs to know; built from `QuantConfig`."""

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False

    @property
    def q_min(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def q_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @classmethod
    def from_config(cls, cfg) -> "QuantSpec":
        return cls(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric)


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View a [out, in] weight as [out, n_groups, group]; per channel is one group of `in`."""
    out_f, in_f = w.shape
    g = spec.group_size or in_f
    if in_f % g:
        raise ValueError(f"group_size {g} does not divide the input dimension {in_f}")
    return w.reshape(out_f, in_f // g, g)


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point, each [out, n_groups] (n_groups = 1 per channel), in w's dtype."""
    wg = _grouped(w.detach(), spec)
    w_min = wg.amin(dim=-1).clamp(max=0)
    w_max = wg.amax(dim=-1).clamp(min=0)
    # Divide by a tensor, not a Python number: CUDA turns `x / c` into `x * (1 / c)`, one ulp off the
    # CPU's correctly rounded quotient, and a scale one ulp apart flips codes at rounding ties (measured:
    # 4 of 16.8 M codes of a 4096² g128 weight; scripts/gpu_check.py). Then a GPU-trained π_θ and the
    # checkpoint exported on a CPU would not hold the same integers.
    if spec.symmetric:
        scale = torch.maximum(w_min.abs(), w_max) / torch.full_like(w_max, spec.q_max)
        zero = torch.zeros_like(scale)
    else:
        scale = (w_max - w_min) / torch.full_like(w_max, spec.q_max - spec.q_min)
        # An all-zero row has scale 0; any positive scale represents it exactly.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(spec.q_min - w_min / scale).clamp(spec.q_min, spec.q_max)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integers (held in w's float dtype), same shape as w."""
    wg = _grouped(w, spec)
    q = torch.round(wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(spec.q_min, spec.q_max)
    return q.reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    qg = _grouped(q, spec)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize(
    w: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize; qparams are computed from w unless given (frozen)."""
    if scale is None or zero is None:
        scale, zero = compute_qparams(w, spec)
    return dequantize(quantize(w, scale, zero, spec), scale, zero, spec)


def quantization_error(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Max |w - w_hat| / s per group: ≤ 0.5 for RTN without clipping (used by tests and reports)."""
    scale, zero = compute_qparams(w, spec)
    err = (_grouped(w - fake_quantize(w, spec, scale, zero), spec).abs() / scale.unsqueeze(-1))
    return err.amax(dim=-1)
