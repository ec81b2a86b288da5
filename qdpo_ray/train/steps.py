"""One micro-step per objective: a micro-batch of pairs in, (loss, metric values in METRICS order) out.

Each function is what a Ray Train worker runs between `engine.backward`s; tests call them with a plain
model. `policy` is the (DeepSpeed-wrapped or plain) π_θ with the response-log-prob mode of
`logps.add_response_logps`; `teacher` is the frozen fp model (KD terms only).
"""

from __future__ import annotations

from typing import Callable

import torch

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _preference(policy, b: dict[str, torch.Tensor], t):
    from qdpo_ray.train.logps import response_logps
    from qdpo_ray.train.losses import preference_loss

    n = b["ref_chosen"].shape[0]
    lp = response_logps(policy, b).double()
    pl = preference_loss(lp[:n], lp[n:], b["ref_chosen"], b["ref_rejected"], t.beta, t.loss_type,
                         t.label_smoothing, b["response_len"][:n], b["response_len"][n:])
    return pl, lp, n


def _values(loss: torch.Tensor, pl, lp: torch.Tensor, n: int) -> list[float]:
    lp = lp.detach()
    return [loss.item(), pl.chosen_rewards.mean().item(), pl.rejected_rewards.mean().item(),
            (pl.chosen_rewards - pl.rejected_rewards).mean().item(),
            (pl.chosen_rewards > pl.rejected_rewards).double().mean().item(),
            lp[:n].mean().item(), lp[n:].mean().item()]


def _kd_on_chosen(policy, teacher, rows, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean per-token KL(teacher ‖ π_θ) over the chosen (fp) answers' positions; also their log-probs."""
    from qdpo_ray.train.batch import collate
    from qdpo_ray.train.losses import kd_loss, sequence_logps

    b = {k: v.to(device) for k, v in collate(rows, pad_id, rejected=False).items()}
    logits = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        tl = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    loss = kd_loss(logits, tl, b["mask"])
    lp = sequence_logps(logits.detach(), b["labels"], b["mask"]).double()
    return loss, lp, b["attention_mask"].sum()


def qdpo_step(policy, rows, t, pad_id: int = 0, teacher=None):
    """Eq. 5 (or IPO/cDPO) against the precomputed reference, prompt-shared rows (`collate_shared`)."""
    from qdpo_ray.train.batch import collate_shared

    b = {k: v.to(_device(policy)) for k, v in collate_shared(rows, pad_id).items()}
    pl, lp, n = _preference(policy, b, t)
    return pl.loss, _values(pl.loss, pl, lp, n), float(b["tokens"])


def qdpo_sft_step(policy, rows, t, pad_id: int = 0, teacher=None):
    """QDPO + α·NLL of the chosen (fp) answer, per token (RPO; TRL's `rpo_alpha`): holds y_w's likelihood
    up while the preference term pushes y_l down."""
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.losses import mixed_loss, sft_nll

    b = {k: v.to(_device(policy)) for k, v in collate_shared(rows, pad_id).items()}
    pl, lp, n = _preference(policy, b, t)
    loss = mixed_loss(pl, sft=sft_nll(lp[:n], b["response_len"][:n]), sft_weight=t.sft_weight)
    return loss, _values(loss, pl, lp, n), float(b["tokens"])


def qdpo_kd_step(policy, rows, t, pad_id: int = 0, teacher=None):
    """QDPO + λ·KL(fp ‖ π_θ) on the chosen answers' tokens (TRL `loss_weights` style): every flipped
    position of y_w gets a gradient toward the fp distribution, not only those the margin still needs."""
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.losses import mixed_loss

    device = _device(policy)
    b = {k: v.to(device) for k, v in collate_shared(rows, pad_id).items()}
    pl, lp, n = _preference(policy, b, t)
    kd, _, _ = _kd_on_chosen(policy, teacher, rows, pad_id, device)
    loss = mixed_loss(pl, kd=kd, kd_weight=t.kd_weight)
    return loss, _values(loss, pl, lp, n), float(b["tokens"])


def kd_step(policy, rows, t, pad_id: int = 0, teacher=None):
    """KD baseline (LLM-QAT style): KL to the fp teacher on the fp answers only."""
    loss, lp, tokens = _kd_on_chosen(policy, teacher, rows, pad_id, _device(policy))
    return loss, [loss.item(), 0.0, 0.0, 0.0, 0.0, lp.mean().item(), 0.0], float(tokens)


# objective → (micro-step, needs the fp teacher in memory, needs reference log-probs)
OBJECTIVES: dict[str, tuple[Callable, bool, bool]] = {
    "qdpo": (qdpo_step, False, True),
    "dpo_fp_ref": (qdpo_step, False, True),
    "qdpo+sft": (qdpo_sft_step, False, True),
    "qdpo+kd": (qdpo_kd_step, True, True),
    "kd": (kd_step, True, False),
}


def preference_micro_step(model, b: dict[str, torch.Tensor], t) -> tuple[torch.Tensor, list[float]]:
    """Loss and metric values of one already-collated `collate_shared` batch (benchmarks call this)."""
    pl, lp, n = _preference(model, b, t)
    return pl.loss, _values(pl.loss, pl, lp, n)
