"""Reference log-probs, computed once before training (like TRL's precompute_ref_log_probs).

For QDPO the reference is π_q, evaluated with the same forward the policy starts from (Q(W) in plain
Linears equals the fake-quant's Q(W); the same compute context), so that at step 0 the implicit rewards
are exactly 0 (up to float summation order). For the sequence-level objectives nothing but the policy is
in memory during training; the token-level ones (`qdpo_flips*`) keep this model beside it.

The scoring runs on the cluster, not the driver: a Ray Data actor pool with the training workers'
resources (one reference model per actor, on its GPU when it has one) maps the pairs to their two
log-probs. At paper scale (50k pairs, 7B) a CPU head node could not do it in reasonable time.
"""

from __future__ import annotations

from typing import Any

import torch

from qdpo_ray.train.batch import collate_shared
from qdpo_ray.train.logps import add_response_logps, response_logps


def load_reference(cfg, init_weights: dict[str, torch.Tensor] | None = None, device="cpu"):
    """π_ref on its own, frozen: π_q built in place as plain Linears holding Q(W) (`quantize_model_rtn`,
    on a starting checkpoint's own grid where it has one) — or the fp model itself for `dpo_fp_ref` —
    from an on-policy round's weights when given (the reference is the previous round's π_θ).

    Loaded as the policy is (`worker.build_policy`: fp32, SDPA), then `precision.frozen_for_compute`: its
    forward under `compute_context` is π_θ's step-0 forward, so step-0 rewards are 0 in bf16 too, with
    the Linear weights in the compute dtype and no fp32 master copy or fake-quant cache beside them."""
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import checkpoint_grid, quantize_model_rtn
    from qdpo_ray.train.precision import frozen_for_compute

    model = load_model(cfg.model, dtype="float32", attn_implementation="sdpa")
    if cfg.train.objective != "dpo_fp_ref":
        if init_weights is not None:
            model.load_state_dict(init_weights, strict=False)  # a checkpoint's grid tensors are read below
        quantize_model_rtn(model, cfg.quant, checkpoint_grid(init_weights or {}))
    return frozen_for_compute(model, cfg.train.precision).to(device)


@torch.no_grad()
def policy_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same response-only forward (`logps.response_logps`) the training step runs."""
    device = next(model.parameters()).device
    return response_logps(add_response_logps(model), {k: v.to(device) for k, v in batch.items()}).double().cpu()


@torch.no_grad()
def add_reference_logps(model, rows: list[dict[str, Any]], batch_size: int = 8, pad_id: int = 0,
                        precision: str = "fp32") -> list[dict[str, Any]]:
    from qdpo_ray.train.precision import compute_context

    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        with compute_context(precision, device):
            lp = policy_logps(model, collate_shared(chunk, pad_id))
        n = len(chunk)
        for r, c, rj in zip(chunk, lp[:n].tolist(), lp[n:].tolist()):
            out.append({**r, "ref_chosen_logps": c, "ref_rejected_logps": rj})
    return out


TOKEN_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")


class ReferenceScorer:
    """Ray Data actor: loads π_ref once, maps a batch of pairs to (id, ref_chosen_logps, ref_rejected_logps)."""

    def __init__(self, cfg_json: dict[str, Any], pad_id: int, init_weights=None):
        import ray

        from qdpo_ray.config import RunConfig

        cfg = RunConfig.model_validate(cfg_json)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_reference(cfg, None if init_weights is None else ray.get(init_weights), device)
        self.micro = cfg.train.per_device_batch_size
        self.pad_id = pad_id
        self.precision = cfg.train.precision

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        # Ray Data hands token lists back as numpy arrays; collate_shared concatenates Python lists.
        rows = [{k: np.asarray(batch[k][i]).tolist() for k in TOKEN_COLUMNS} for i in range(len(batch["id"]))]
        scored = add_reference_logps(self.model, rows, self.micro, self.pad_id, self.precision)
        return {"id": batch["id"],
                "ref_chosen_logps": np.array([r["ref_chosen_logps"] for r in scored]),
                "ref_rejected_logps": np.array([r["ref_rejected_logps"] for r in scored])}


def score_on_ray(cfg, rows: list[dict[str, Any]], pad_id: int, init_weights=None) -> list[dict[str, Any]]:
    """`rows` with their reference log-probs, scored by `train.num_workers` ReferenceScorer actors, each
    with a training worker's CPUs/GPUs (free at this point: training has not started)."""
    import ray.data

    t = cfg.train
    slim = [{"id": str(r["id"]), **{k: list(r[k]) for k in TOKEN_COLUMNS}} for r in rows]
    ds = ray.data.from_items(slim).map_batches(
        ReferenceScorer, fn_constructor_kwargs={"cfg_json": cfg.model_dump(mode="json"), "pad_id": pad_id,
                               "init_weights": init_weights},
        batch_size=max(t.per_device_batch_size * 4, 1), compute=ray.data.ActorPoolStrategy(size=t.num_workers),
        num_cpus=t.cpus_per_worker, num_gpus=t.gpus_per_worker or None)
    got = {r["id"]: r for r in ds.take_all()}
    missing = [r["id"] for r in slim if r["id"] not in got]
    if missing:
        raise RuntimeError(f"reference scoring returned no log-probs for {len(missing)} pairs, e.g. {missing[:3]}")
    return [{**r, "ref_chosen_logps": float(got[s["id"]]["ref_chosen_logps"]),
             "ref_rejected_logps": float(got[s["id"]]["ref_rejected_logps"])} for r, s in zip(rows, slim)]
