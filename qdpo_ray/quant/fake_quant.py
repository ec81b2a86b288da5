"""Fake-quant Linear with a straight-through estimator, and the model-level swaps.

π_θ in QDPO keeps a full-precision master weight but computes with its RTN quantize-dequantize, so the
forward pass is exactly π_q's while the gradient of the rounding is taken as the identity (paper
Algorithm 1: ∂L/∂θ ≈ ∂L/∂θ_q). `FakeQuantLinear` subclasses `nn.Linear` and keeps the parameter names
(`weight`, `bias`), so state dicts stay plain Hugging Face checkpoints and peft can wrap it for LoRA.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from qdpo_ray.quant.rtn import QuantSpec, compute_qparams, fake_quantize


class _STEFakeQuant(torch.autograd.Function):
    """Forward: RTN quantize-dequantize. Backward: the gradient passes unchanged to the master weight.

    A custom Function rather than `w + (fq(w) - w).detach()`: that trick is not bit-exact in floating
    point, and step 0 of QDPO must be exactly π_q.
    """

    @staticmethod
    def forward(ctx, w, spec, scale, zero):
        # Quantizer maths in fp32 whatever the compute dtype, like quantize_model_rtn and the export.
        return fake_quantize(w.float(), spec, scale, zero).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses the RTN-quantized weight (STE in backward)."""

    spec: QuantSpec

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, freeze_qparams: bool = False) -> "FakeQuantLinear":
        # Build on the meta device, then adopt the original Parameters: no copy, same tensors, so an
        # optimizer or DeepSpeed built afterwards sees the usual parameter names.
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.spec = spec
        new.register_buffer("frozen_scale", None, persistent=False)
        new.register_buffer("frozen_zero", None, persistent=False)
        if freeze_qparams:
            new.freeze_qparams()
        return new

    @torch.no_grad()
    def freeze_qparams(self) -> None:
        """Fix scale/zero point to those of the current weight (the default recomputes every forward)."""
        self.frozen_scale, self.frozen_zero = compute_qparams(self.weight.float(), self.spec)

    def quantized_weight(self) -> torch.Tensor:
        # DeepSpeed ZeRO-3 (ds_id) swaps partitioned storage in and out: never cache across forwards there.
        if (torch.is_grad_enabled() and self.weight.requires_grad) or hasattr(self.weight, "ds_id"):
            return _STEFakeQuant.apply(self.weight, self.spec, self.frozen_scale, self.frozen_zero)
        # Inference (generation, reference log-probs): the weight does not change between forwards,
        # so quantize once per weight version instead of once per decoded token.
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype)
        cached = self.__dict__.get("_qweight_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                qw = fake_quantize(self.weight.float(), self.spec, self.frozen_scale, self.frozen_zero)
            cached = (key, qw.to(self.weight.dtype))
            self.__dict__["_qweight_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def _apply(self, fn, recurse=True):
        # The frozen grid is fp32 whatever the module is cast to (`model.to(torch.bfloat16)`, a ZeRO
        # cast): the export packs on the fp32 grid, so training must quantize on it too. Device moves apply.
        grid = {k: getattr(self, k) for k in ("frozen_scale", "frozen_zero") if getattr(self, k) is not None}
        for k in grid:
            setattr(self, k, None)
        super()._apply(fn, recurse)
        for k, g in grid.items():
            device = fn(torch.empty(0, dtype=g.dtype, device=g.device)).device
            setattr(self, k, g.to(device=device, dtype=torch.float32))
        return self

    def to_linear(self) -> nn.Linear:
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.spec.bits}, group_size={self.spec.group_size}, " \
            f"symmetric={self.spec.symmetric}"


def _ignored(name: str, ignore: list[str]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def quant_targets(model: nn.Module, targets: list[str], ignore: list[str]) -> Iterator[tuple[str, nn.Module]]:
    """The (name, module) pairs that quantization applies to."""
    for name, module in model.named_modules():
        if type(module).__name__ in targets or (isinstance(module, nn.Linear) and "Linear" in targets):
            if not _ignored(name, ignore):
                yield name, module


def check_group_size(model: nn.Module, cfg) -> None:
    """Fail early, naming the field, when a group size does not divide some layer's input dim."""
    if cfg.group_size is None:
        return
    from qdpo_ray.config import ConfigError

    dims = sorted({m.in_features for _, m in quant_targets(model, cfg.targets, cfg.ignore)})
    bad = [d for d in dims if d % cfg.group_size]
    if bad:
        ok = [g for g in (32, 64, 128, 256) if all(d % g == 0 for d in dims)]
        raise ConfigError(
            f"quant.group_size={cfg.group_size} does not divide the input dimension(s) {bad} of this "
            f"model's layers (all: {dims}); use one of {ok or 'null (per channel)'}"
        )


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def to_fake_quant(model: nn.Module, cfg) -> nn.Module:
    """Replace every targeted nn.Linear by a FakeQuantLinear (in place). `cfg` is a QuantConfig."""
    if not cfg.enabled:
        return model
    check_group_size(model, cfg)
    spec = QuantSpec.from_config(cfg)
    for name, module in list(quant_targets(model, cfg.targets, cfg.ignore)):
        if isinstance(module, nn.Linear) and not isinstance(module, FakeQuantLinear):
            _set_module(model, name, FakeQuantLinear.from_linear(module, spec, cfg.freeze_qparams))
    return model


# What a compressed-tensors checkpoint's state dict holds per quantized Linear beside its weight.
GRID_SUFFIXES = (".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")


def checkpoint_grid(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer name → (scale, integer zero point) of a quantized checkpoint's state dict (compressed-tensors
    names, as `models.load_model` of an AWQ/GPTQ/RTN checkpoint returns it); {} for a plain one."""
    grid = {}
    for key, scale in weights.items():
        if key.endswith(".weight_scale"):
            name = key.removesuffix(".weight_scale")
            zero = weights.get(name + ".weight_zero_point")
            grid[name] = (scale.float(), torch.zeros_like(scale, dtype=torch.float32) if zero is None else zero.float())
    return grid


# Written by `ptq_worker.py` beside an AWQ checkpoint: the activation-scaled fp weights of its quantized
# layers before rounding (safetensors, `<layer>.weight`).
LATENT_FILE = "latent.safetensors"


def latent_start(weights: dict[str, torch.Tensor], latent: dict[str, torch.Tensor],
                 spec: QuantSpec) -> tuple[dict[str, torch.Tensor], int]:
    """A quantized checkpoint's state dict with each quantized layer's de-quantized weight replaced by its
    latent (pre-rounding) weight; returns the new dict and how many layers were replaced.

    Why: STE training moves a 4-bit code only when the master weight crosses a rounding boundary. A
    de-quantized weight sits at its bin's centre, half a step from either boundary, so from it a few dozen
    steps at lr 1e-4 move no code at all, while latent weights sit where AWQ's scaling put them (as RTN's
    fp weights do). Each latent weight must round to the checkpoint's integers on its grid — the same π_q at
    step 0 — or this raises a ConfigError naming the layer.
    """
    from qdpo_ray.config import ConfigError
    from qdpo_ray.quant.rtn import quantize

    out, n = dict(weights), 0
    for name, (scale, zero) in checkpoint_grid(weights).items():
        key = name + ".weight"
        if key not in latent:
            continue
        lw = latent[key].float()
        if lw.shape != weights[key].shape or not torch.equal(quantize(lw, scale, zero, spec),
                                                             quantize(weights[key].float(), scale, zero, spec)):
            raise ConfigError(f"{LATENT_FILE}: the latent weight of {name} does not round to the checkpoint's "
                              "integers on its grid (another checkpoint's file?); delete the file to start from "
                              "the de-quantized weights")
        out[key] = lw.to(weights[key].dtype)
        n += 1
    return out, n


def freeze_grid(model: nn.Module, grid: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fix every FakeQuantLinear named in `grid` to that scale and zero point (a checkpoint's own grid,
    e.g. AWQ's, which min-max RTN of its de-quantized weights would not reproduce)."""
    from qdpo_ray.config import ConfigError

    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and name in grid:
            scale, zero = grid[name]
            want = compute_qparams(m.weight.detach()[:1].float(), m.spec)[0].shape[1:]
            if scale.shape != (m.out_features, *want):
                raise ConfigError(f"the starting checkpoint's grid of {name} has shape {tuple(scale.shape)}, but "
                                  f"quant (bits={m.spec.bits}, group_size={m.spec.group_size}) makes "
                                  f"{(m.out_features, *want)}; set the quant section to the checkpoint's scheme")
            m.frozen_scale, m.frozen_zero = scale.to(m.weight.device), zero.to(m.weight.device)


def from_fake_quant(model: nn.Module) -> nn.Module:
    """Undo `to_fake_quant`: plain nn.Linear modules holding the (unquantized) master weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            _set_module(model, name, module.to_linear())
    return model


@torch.no_grad()
def quantize_model_rtn(model: nn.Module, cfg, grid: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                       ) -> nn.Module:
    """π_q as a plain model: every targeted weight replaced by its RTN quantize-dequantize (in place), on
    min-max grids or, for the layers `grid` names (`checkpoint_grid`), on that scale and zero point."""
    if not cfg.enabled:
        return model
    check_group_size(model, cfg)
    spec = QuantSpec.from_config(cfg)
    grid = grid or {}
    for name, module in quant_targets(model, cfg.targets, cfg.ignore):
        if isinstance(module, nn.Linear):
            scale, zero = grid.get(name, (None, None))
            # in place: replacing `.data` frees ~200 weight-sized blocks, which raises glibc's mmap
            # threshold and with it the heap high-water mark of everything allocated afterwards
            module.weight.data.copy_(fake_quantize(module.weight.float(), spec, scale, zero))
    return model
