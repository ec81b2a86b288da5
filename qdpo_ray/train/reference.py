"""Reference log-probs, computed once before training (like TRL's precompute_ref_log_probs).

For QDPO the reference is π_q, evaluated with the *same* fake-quant forward the policy starts from, so
that at step 0 the implicit rewards are exactly 0 (up to float summation order). Nothing but the policy
is in memory during training.

The scoring runs on the cluster, not the driver: a Ray Data actor pool with the training workers'
resources (one reference model per actor, on its GPU when it has one) maps the pairs to their two
log-probs. At paper scale (50k pairs, 7B) a CPU head node could not do it in reasonable time.
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


def load_reference(cfg, init_weights: dict[str, torch.Tensor] | None = None, device="cpu"):
    """π_ref on its own, frozen: loaded as the policy is (`worker.build_policy`: fp32, SDPA), from an
    on-policy round's weights when given (the reference is the previous round's π_θ), then
    `reference_model` in the dtype DeepSpeed gives the policy (`train.precision`), so that step-0 rewards
    are 0 in bf16 too."""
    from qdpo_ray.models import load_model

    fp = load_model(cfg.model, dtype="float32", attn_implementation="sdpa")
    if init_weights is not None and cfg.train.objective != "dpo_fp_ref":
        fp.load_state_dict(init_weights, strict=False)  # a checkpoint's grid tensors are read below
    model = reference_model(fp, cfg)
    del fp
    if cfg.train.objective != "dpo_fp_ref":
        from qdpo_ray.quant.fake_quant import checkpoint_grid, freeze_grid

        freeze_grid(model, checkpoint_grid(init_weights or {}))  # as `worker.build_policy` does
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


@torch.no_grad()
def policy_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same response-only forward (`logps.response_logps`) the training step runs."""
    device = next(model.parameters()).device
    return response_logps(add_response_logps(model), {k: v.to(device) for k, v in batch.items()}).double().cpu()


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

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        # Ray Data hands token lists back as numpy arrays; collate_shared concatenates Python lists.
        rows = [{k: np.asarray(batch[k][i]).tolist() for k in TOKEN_COLUMNS} for i in range(len(batch["id"]))]
        scored = add_reference_logps(self.model, rows, self.micro, self.pad_id)
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
