"""Collectives of the training loop, on the device the process group can reduce.

NCCL (every GPU run) reduces only CUDA tensors and gloo CPU ones, so a tensor built on the CPU by habit
works in CI (gloo) and fails at the first step of any GPU job. Tensors here are created on the caller's
device — the DeepSpeed engine's (`engine.device`) in the worker.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_step_metrics(values: list[float], device: torch.device | str) -> list[float]:
    """Sum `values` over all ranks (fp64 on `device`); without a process group it is the identity."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu().tolist()
