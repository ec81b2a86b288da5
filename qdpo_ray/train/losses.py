"""QDPO / DPO / IPO / cDPO / KD losses — pure functions of log-probs and logits.

QDPO (paper eq. 5) is DPO with the preference pair (y_w = fp answer, y_l = quantized answer) and the
quantized model π_q as the reference:

    L = -log σ( β [log π_θ(y_w|x) − log π_q(y_w|x)] − β [log π_θ(y_l|x) − log π_q(y_l|x)] )

with log π(y|x) the sum of the response tokens' log-probs (prompt and padding masked). The implicit
rewards β·(log π_θ − log π_ref) are what TRL logs as rewards/chosen and rewards/rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | prefix) for each position; logits[:, t] predicts labels[:, t]. [B, T].

    logit[label] − logsumexp(logits) instead of gathering from a full log_softmax: one fewer
    [B, T, vocab] fp32 tensor alive (the vocabulary is 49k–150k wide, the rest of the model is small).
    """
    logits = logits.float()
    picked = torch.gather(logits, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the masked (response) tokens: [B]."""
    return (token_logps(logits, labels) * mask).sum(-1)


@dataclass
class PreferenceLoss:
    loss: torch.Tensor            # scalar, mean over the batch
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None
                    ) -> PreferenceLoss:
    """DPO-family loss from summed sequence log-probs of policy and reference.

    sigmoid: DPO / QDPO (eq. 5); with label_smoothing ε > 0 it is conservative DPO (cDPO), which
             assumes a share ε of the preference labels is flipped.
    ipo:     IPO, (h − 1/(2β))² on per-token average log-ratios (needs chosen_len/rejected_len), as the
             IPO authors and TRL normalise it.
    """
    chosen_lr = policy_chosen - ref_chosen
    rejected_lr = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        h = beta * (chosen_lr - rejected_lr)
        per = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("ipo needs the response lengths")
        h = chosen_lr / chosen_len.clamp(min=1) - rejected_lr / rejected_len.clamp(min=1)
        per = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use sigmoid or ipo")
    return PreferenceLoss(per.mean(), (beta * chosen_lr).detach(), (beta * rejected_lr).detach())


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) over masked positions (LLM-QAT style distillation)."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
