"""One micro-step per objective: a micro-batch of pairs in, (loss, metric values in METRICS order) out.

Each function is what a Ray Train worker runs between `engine.backward`s; tests call them with a plain
model. `policy` is the (DeepSpeed-wrapped or plain) π_θ with the response-log-prob mode of
`logps.add_response_logps`; `teacher` is the frozen fp model (KD terms only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


def _answers_forward(policy, rows, pad_id: int, device, *frozen, rejected: bool = False):
    """π_θ's logits over the chosen (fp) answers, teacher-forced — and over the rejected (π_q's) answers after
    them with `rejected` — and those of each frozen model (no grad); the batch (`collate`) gives labels and
    the response mask, rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]."""
    from qdpo_ray.train.batch import collate

    b = {k: v.to(device) for k, v in collate(rows, pad_id, rejected=rejected).items()}
    logits = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        others = [m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1] for m in frozen]
    return b, logits, others


def _kd(policy, teacher, rows, pad_id: int, device, rejected: bool = False):
    """Mean per-token KL(teacher ‖ π_θ) over the chosen (fp) answers' positions (and the rejected answers'
    with `rejected`); also the chosen answers' log-probs and the tokens the batch holds."""
    from qdpo_ray.train.losses import kd_loss, sequence_logps

    b, logits, (tl,) = _answers_forward(policy, rows, pad_id, device, teacher, rejected=rejected)
    loss = kd_loss(logits, tl, b["mask"])
    n = len(rows)
    lp = sequence_logps(logits[:n].detach(), b["labels"][:n], b["mask"][:n]).double()
    return loss, lp, b["attention_mask"].sum()


def qdpo_step(policy, rows, t, pad_id: int = 0, teacher=None, reference=None):
    """Eq. 5 (or IPO/cDPO) against the precomputed reference, prompt-shared rows (`collate_shared`)."""
    from qdpo_ray.train.batch import collate_shared

    b = {k: v.to(_device(policy)) for k, v in collate_shared(rows, pad_id).items()}
    pl, lp, n = _preference(policy, b, t)
    return pl.loss, _values(pl.loss, pl, lp, n), float(b["tokens"])


def qdpo_sft_step(policy, rows, t, pad_id: int = 0, teacher=None, reference=None):
    """QDPO + α·NLL of the chosen (fp) answer, per token (RPO; TRL's `rpo_alpha`): holds y_w's likelihood
    up while the preference term pushes y_l down."""
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.losses import mixed_loss, sft_nll

    b = {k: v.to(_device(policy)) for k, v in collate_shared(rows, pad_id).items()}
    pl, lp, n = _preference(policy, b, t)
    loss = mixed_loss(pl, sft=sft_nll(lp[:n], b["response_len"][:n]), sft_weight=t.sft_weight)
    return loss, _values(loss, pl, lp, n), float(b["tokens"])


def qdpo_kd_step(policy, rows, t, pad_id: int = 0, teacher=None, reference=None):
    """QDPO + λ·KL(fp ‖ π_θ) on the chosen answers' tokens (TRL `loss_weights` style): every flipped
    position of y_w gets a gradient toward the fp distribution, not only those the margin still needs."""
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.losses import mixed_loss

    device = _device(policy)
    b = {k: v.to(device) for k, v in collate_shared(rows, pad_id).items()}
    pl, lp, n = _preference(policy, b, t)
    kd, _, _ = _kd(policy, teacher, rows, pad_id, device)
    loss = mixed_loss(pl, kd=kd, kd_weight=t.kd_weight)
    return loss, _values(loss, pl, lp, n), float(b["tokens"])


def kd_step(policy, rows, t, pad_id: int = 0, teacher=None, reference=None):
    """KD baseline (LLM-QAT style): KL to the fp teacher on the fp answers (and on π_q's own answers with
    `t.answers` = both: on-policy KD, GKD-style)."""
    loss, lp, tokens = _kd(policy, teacher, rows, pad_id, _device(policy), rejected=t.answers == "both")
    return loss, [loss.item(), 0.0, 0.0, 0.0, 0.0, lp.mean().item(), 0.0], float(tokens)


def qdpo_flips_step(policy, rows, t, pad_id: int = 0, teacher=None, reference=None):
    """Flip-level QDPO (`losses.flip_preference_loss`): eq. 5 at every position of the fp answer where the
    reference π_q's argmax differs (π_θ's own with `t.flips_of` = policy), from one teacher-forced pass of
    π_θ and of π_q over prompt + y_w (the anchored L = 1 pairs of every flip at once). With `t.kd_weight` > 0
    (objective `qdpo_flips+kd`) plus λ·KL(fp ‖ π_θ) on all of y_w, from the same pass.

    With `t.answers` = both the pass also runs over prompt + y_l, π_q's own greedy answer: the prefixes the
    quantized model itself generates, where the fp model's argmax is y_k — after the first divergence the
    states KD on y_w never visits. The KD term then covers y_l's positions too."""
    from qdpo_ray.train.losses import flip_preference_loss, kd_loss, mixed_loss

    both = t.answers == "both"
    kd_on = t.objective == "qdpo_flips+kd"
    frozen = (reference, teacher) if kd_on or both else (reference,)
    b, logits, others = _answers_forward(policy, rows, pad_id, _device(policy), *frozen, rejected=both)
    targets = b["labels"].clone()
    if both:  # on π_q's answers the token to prefer is the fp model's argmax, not the answer's own token
        n = len(rows)
        targets[n:] = others[1][n:].argmax(-1)
    sel = b["mask"].bool()
    pl, _ = flip_preference_loss(logits[sel], others[0][sel], targets[sel], t.beta, t.flip_margin, t.flips_of)
    kd = kd_loss(logits, others[1], b["mask"]) if kd_on else None
    loss = mixed_loss(pl, kd=kd, kd_weight=t.kd_weight if kd is not None else 0.0)
    # per flip (TRL's names, token-level): implicit rewards, and π_θ's log-probs of y_k and of r_k
    margins = pl.chosen_rewards - pl.rejected_rewards
    mean = (lambda x: x.double().mean().item() if x.numel() else 0.0)
    return loss, [loss.item(), mean(pl.chosen_rewards), mean(pl.rejected_rewards), mean(margins),
                  mean(margins > 0), mean(pl.chosen_logps), mean(pl.rejected_logps)], float(b["attention_mask"].sum())


@dataclass(frozen=True)
class Objective:
    step: Callable              # the micro-step
    teacher: bool = False       # the fp model in every worker's memory (KD terms)
    reference_logps: bool = False  # sequence log-probs of π_ref precomputed per pair (`reference.py`)
    reference_model: bool = False  # π_ref itself in every worker's memory (token-level terms)
    rejected: bool = True       # reads the rejected answers (pairs without one are dropped)


OBJECTIVES: dict[str, Objective] = {
    "qdpo": Objective(qdpo_step, reference_logps=True),
    "dpo_fp_ref": Objective(qdpo_step, reference_logps=True),
    "qdpo+sft": Objective(qdpo_sft_step, reference_logps=True),
    "qdpo+kd": Objective(qdpo_kd_step, teacher=True, reference_logps=True),
    "qdpo_flips": Objective(qdpo_flips_step, reference_model=True, rejected=False),
    "qdpo_flips+kd": Objective(qdpo_flips_step, teacher=True, reference_model=True, rejected=False),
    "kd": Objective(kd_step, teacher=True, rejected=False),
}


def objective_of(t) -> Objective:
    """What `t.objective` reads and loads under `t` (`answers: both` adds π_q's answers and the fp teacher)."""
    o = OBJECTIVES[t.objective]
    if t.answers == "both":
        o = replace(o, teacher=True, rejected=True)
    return o


def preference_micro_step(model, b: dict[str, torch.Tensor], t) -> tuple[torch.Tensor, list[float]]:
    """Loss and metric values of one already-collated `collate_shared` batch (benchmarks call this)."""
    pl, lp, n = _preference(model, b, t)
    return pl.loss, _values(pl.loss, pl, lp, n)
