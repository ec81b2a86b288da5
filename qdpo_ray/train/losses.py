"""QDPO / DPO / IPO / cDPO / KD losses and their mixes — pure functions of log-probs and logits.

QDPO (paper eq. 5) is DPO with the preference pair (y_w = fp answer, y_l = quantized answer) and the
quantized model π_q as the reference:

    L = -log σ( β [log π_θ(y_w|x) − log π_q(y_w|x)] − β [log π_θ(y_l|x) − log π_q(y_l|x)] )

with log π(y|x) the sum of the response tokens' log-probs (prompt and padding masked). The implicit
rewards β·(log π_θ − log π_ref) are what TRL logs as rewards/chosen and rewards/rejected.

Mixes (`mixed_loss`): qdpo+kd adds λ·KL(fp teacher ‖ π_θ) on the chosen tokens, qdpo+sft adds RPO's
α·NLL of the chosen (fp) answer, as TRL's `loss_weights` / `rpo_alpha` do.

Flip-level QDPO (`flip_preference_loss`): eq. 5 for every token flip of the fp answer at once — the
anchored pairs with continuation length 1 (prompt + y[:k], chosen y_k, rejected π_q's argmax there) of
*every* flip, scored from one teacher-forced pass over prompt + y instead of one pass per anchor.
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


# fp32 logits held at once by `chunked_token_logps`: 64 MiB = 341 tokens of a 49k vocabulary
CHUNK_BYTES = 64 * 2**20


def chunk_tokens(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab))


class _ChunkedTokenLogps(torch.autograd.Function):
    """`token_logps(F.linear(hidden, weight, bias), labels)` for [N, H] hidden states, `chunk` rows at a time.

    Forward keeps only the per-token logsumexp; backward recomputes each chunk's logits and turns them in
    place into ∂L/∂logits = g·(onehot(label) − softmax), so at most one [chunk, vocab] fp32 tensor is alive
    in either pass instead of the [N, vocab] logits and their log-softmax/backward copies. The head's
    weight gradient is accumulated in fp32 over the chunks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = F.linear(hidden[s:e], weight, bias).float()
            # the same ops, in the same order, as token_logps
            picked = torch.gather(logits, 1, labels[s:e].unsqueeze(-1)).squeeze(-1)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            out[s:e] = picked - lse[s:e]
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, chunk = hidden.shape[0], ctx.chunk
        g = grad_out.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h = hidden[s:e]
            gc = g[s:e].unsqueeze(-1)
            # softmax from the saved logsumexp, then ∂/∂logits of g·(logit[label] − lse) = g·(onehot − softmax)
            d = F.linear(h, weight, bias).float().sub_(lse[s:e].unsqueeze(-1)).exp_().mul_(-gc)
            d.scatter_add_(1, labels[s:e].unsqueeze(-1), gc)
            d = d.to(weight.dtype)
            if need_h:
                torch.mm(d, weight, out=grad_h[s:e])
            if need_w:
                if d.dtype == torch.float32:
                    grad_w.addmm_(d.t(), h)
                else:
                    grad_w += (d.t() @ h).float()
            if need_b:
                grad_b += d.float().sum(0)
            del d
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """log p(labels[i] | hidden[i]) through the LM head (weight [V, H], bias [V]) without the [N, V] logits.

    Equal to `token_logps(F.linear(hidden, weight, bias), labels)` (up to matmul summation order), with
    the same gradients; hidden [N, H], labels [N] → [N] fp32.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    chunk = chunk or chunk_tokens(weight.shape[0])
    return _ChunkedTokenLogps.apply(hidden, weight, bias, labels.clamp(min=0), chunk)


@dataclass
class PreferenceLoss:
    loss: torch.Tensor            # scalar, mean over the batch
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor | None = None    # π_θ's log-probs of each pair's tokens, detached (token-level
    rejected_logps: torch.Tensor | None = None  # pairs: `flip_preference_loss`; sequence pairs carry their own)


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


def strongest_other(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Index of the highest-scoring token other than y at each row: logits [N, V], y [N, 1] → [N, 1]."""
    return logits.detach().scatter(-1, y, float("-inf")).argmax(-1, keepdim=True)


def flip_preference_loss(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                         beta: float = 0.1, margin: float = 0.0,
                         flips_of: str = "reference") -> tuple[PreferenceLoss, torch.Tensor]:
    """Eq. 5 at every flip of a teacher-forced answer: rows are response positions, [N, V] logits of π_θ
    and of the reference (no grad), labels [N] the fp answer's tokens y_k.

    At each position the rejected token r_k is the reference's strongest token other than y_k; a position
    gets a pair when the reference's margin log π_ref(y_k) − log π_ref(r_k) is below `margin`. With the
    default 0 those are exactly the flips (π_ref's argmax r_k ≠ y_k); a positive `margin` adds the near-flips
    whose fp token wins by less, which training could flip. Each pair (prompt + y[:k], y_k, r_k) gets
    −log σ(β[(log π_θ(y_k) − log π_ref(y_k)) − (log π_θ(r_k) − log π_ref(r_k))]) — what `preference_loss`
    gives the anchored pair with continuation length 1 — and the loss is their mean (each anchored pair
    weighs the same, as DPO's mean over pairs). Returns the loss (a connected 0 when no position
    qualifies) with per-pair rewards and π_θ's log-probs of y_k and r_k, and the mask [N] of positions that
    got a pair.

    flips_of="policy" takes the flips, and r_k, from π_θ itself (its detached logits at this step) instead:
    on-policy token pairs. A flip then leaves the loss once π_θ's own margin reaches `margin` — it is not
    pushed on toward the ~6/β nats at which eq. 5 saturates — and a flip that training creates where π_q
    was right gets a pair at once. The reference in eq. 5 stays π_ref.
    """
    if flips_of not in ("reference", "policy"):
        raise ValueError(f"flips_of must be 'reference' or 'policy', got {flips_of!r}")
    y = labels.unsqueeze(-1)
    judge = (ref_logits if flips_of == "reference" else policy_logits).detach()
    rejected = strongest_other(judge, y)
    # a log-prob margin is a logit margin: no softmax over the [N, V] rows that get no pair
    pairs = (judge.gather(-1, y).float() - judge.gather(-1, rejected).float()).squeeze(-1) < margin
    pol = policy_logits[pairs].float().log_softmax(-1)
    ref = ref_logits[pairs].detach().float().log_softmax(-1)
    y, r = y[pairs], rejected[pairs]
    lp_y, lp_r = pol.gather(-1, y).squeeze(-1), pol.gather(-1, r).squeeze(-1)
    chosen_lr = lp_y - ref.gather(-1, y).squeeze(-1)
    rejected_lr = lp_r - ref.gather(-1, r).squeeze(-1)
    per = -F.logsigmoid(beta * (chosen_lr - rejected_lr))
    loss = per.mean() if per.numel() else 0 * policy_logits.float().sum()
    return (PreferenceLoss(loss, (beta * chosen_lr).detach(), (beta * rejected_lr).detach(), lp_y.detach(),
                           lp_r.detach()), pairs)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) = Σ_v p_t(v) (log p_t(v) − log p_s(v)) at each position: [..., V] → [...] fp32."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) over masked positions (LLM-QAT style distillation)."""
    kl = token_kl(student_logits, teacher_logits)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def response_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over response positions given as rows: [N, V] logits at the chosen
    tokens' positions (the fp teacher's and the policy's) → scalar. N = 0 gives a connected 0."""
    if student_logits.shape[0] == 0:
        return 0 * student_logits.float().sum()
    return token_kl(student_logits, teacher_logits).mean()


def _head_kl_sum(hidden, weight, bias, teacher_logits):
    return token_kl(F.linear(hidden, weight, bias), teacher_logits).sum()


def chunked_response_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             teacher_logits: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`response_kd_loss(F.linear(hidden, weight, bias), teacher_logits)` without the policy's [N, V] logits.

    hidden [N, H]: the policy's final hidden states at the chosen response positions (as
    `logps.response_logps` selects them); weight/bias: its LM head; teacher_logits [N, V] (no grad).
    Each `chunk` rows run under activation checkpointing, so at most one chunk of policy logits is alive
    in forward or backward. Same value and gradients as the plain form (up to summation order).
    """
    from torch.utils.checkpoint import checkpoint

    n = hidden.shape[0]
    if n == 0:
        return 0 * hidden.float().sum()
    chunk = chunk or chunk_tokens(weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        h, t = hidden[s:s + chunk], teacher_logits[s:s + chunk].detach()
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_head_kl_sum, h, weight, bias, t, use_reentrant=False)
        else:
            total = total + _head_kl_sum(h, weight, bias, t)
    return total / n


def sft_nll(chosen_logps: torch.Tensor, chosen_len: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024; TRL `rpo_alpha`, in TRL 1.x `loss_type=[..., "sft"]`): mean negative
    log-likelihood per chosen token.

    chosen_logps [B]: summed log π_θ(y_w|x) of each chosen response (prompt and padding masked, as
    `sequence_logps` / `response_logps` give them); chosen_len [B]: its number of response tokens.
    Default, as TRL's cross-entropy over the batch's chosen tokens: −Σ_b logp_b / Σ_b len_b (a token mean
    over the batch). per_sequence=True: the RPO paper's −mean_b(logp_b / len_b) (each answer weighs the same).
    """
    lens = chosen_len.to(chosen_logps.dtype)
    if per_sequence:
        return -(chosen_logps / lens.clamp(min=1)).mean()
    return -chosen_logps.sum() / lens.sum().clamp(min=1)


def mixed_loss(pref: PreferenceLoss, kd: torch.Tensor | None = None, sft: torch.Tensor | None = None,
               kd_weight: float = 0.0, sft_weight: float = 0.0, dpo_weight: float = 1.0) -> torch.Tensor:
    """Objective mixes on top of QDPO (TRL `loss_weights` style), a scalar:

        qdpo+kd:  L = w_dpo · L_dpo + λ · L_kd     (L_kd: `response_kd_loss` / `kd_loss` on chosen tokens)
        qdpo+sft: L = w_dpo · L_dpo + α · NLL(y_w)  (RPO; NLL: `sft_nll`)

    Both may be on at once. A term with weight 0 is left out entirely (its tensor may then be None, and a
    NaN in it cannot leak), so kd_weight = sft_weight = 0 returns `pref.loss` itself: plain QDPO.
    """
    terms = []
    for name, term, w in (("dpo", pref.loss, dpo_weight), ("kd", kd, kd_weight), ("sft", sft, sft_weight)):
        if w < 0:
            raise ValueError(f"{name}_weight must be >= 0, got {w}")
        if w and term is None:
            raise ValueError(f"{name}_weight={w} needs the {name} term")
        if w:
            terms.append(term if w == 1 else w * term)
    if not terms:
        raise ValueError("every loss weight is 0")
    loss = terms[0]
    for t in terms[1:]:
        loss = loss + t
    return loss
