"""Reference log-probs, computed once before training (like TRL's precompute_ref_log_probs).

For QDPO the reference is π_q, evaluated with the *same* fake-quant forward the policy starts from, so
that at step 0 the implicit rewards are exactly 0 (up to float summation order). Nothing but the policy
is in memory during training.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from qdpo_ray.train.batch import collate_shared
from qdpo_ray.train.logps import add_response_logps, response_logps


def reference_model(fp_model, cfg):
    """π_ref for the objective: π_q (fake-quant, qdpo) or the fp model itself (dpo_fp_ref)."""
    from qdpo_ray.quant.fake_quant import to_fake_quant

    if cfg.train.objective == "dpo_fp_ref":
        return fp_model
    return to_fake_quant(copy.deepcopy(fp_model), cfg.quant)


@torch.no_grad()
def policy_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same response-only forward (`logps.response_logps`) the training step runs."""
    return response_logps(add_response_logps(model), batch).double()


@torch.no_grad()
def add_reference_logps(model, rows: list[dict[str, Any]], batch_size: int = 8, pad_id: int = 0
                        ) -> list[dict[str, Any]]:
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        lp = policy_logps(model, collate_shared(chunk, pad_id))
        n = len(chunk)
        for r, c, rj in zip(chunk, lp[:n].tolist(), lp[n:].tolist()):
            out.append({**r, "ref_chosen_logps": c, "ref_rejected_logps": rj})
    return out
