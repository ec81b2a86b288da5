"""Pairs → padded tensors for one forward pass over chosen and rejected answers (TRL's concatenated layout).

Each sequence is prompt + response. `labels[:, t]` is the token that `logits[:, t]` predicts (the input
shifted by one); `mask` keeps only response positions, so prompt and padding never count.
"""

from __future__ import annotations

from typing import Any

import torch


def truncate(row: dict[str, Any], max_prompt_len: int, max_response_len: int) -> dict[str, Any]:
    """Left-truncate the prompt (keep the end, where the answer starts) and right-truncate responses."""
    out = dict(row)
    out["prompt_token_ids"] = list(row["prompt_token_ids"])[-max_prompt_len:]
    out["chosen_token_ids"] = list(row["chosen_token_ids"])[:max_response_len]
    out["rejected_token_ids"] = list(row["rejected_token_ids"])[:max_response_len]
    return out


def collate(rows: list[dict[str, Any]], pad_id: int = 0, rejected: bool = True) -> dict[str, torch.Tensor]:
    """[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] right-padded (only chosen if rejected=False)."""
    keys = ["chosen_token_ids", "rejected_token_ids"] if rejected else ["chosen_token_ids"]
    seqs, starts = [], []
    for key in keys:
        for r in rows:
            p = list(r["prompt_token_ids"])
            seqs.append(p + list(r[key]))
            starts.append(len(p))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        mask[i, st - 1:len(s) - 1] = 1.0  # logits at st-1 predict the first response token
    batch = {"input_ids": ids, "attention_mask": attn, "labels": ids[:, 1:].clone(), "mask": mask,
             "response_len": mask.sum(-1)}
    if rows and "ref_chosen_logps" in rows[0]:
        batch["ref_chosen"] = torch.tensor([float(r["ref_chosen_logps"]) for r in rows], dtype=torch.float64)
        batch["ref_rejected"] = torch.tensor([float(r["ref_rejected_logps"]) for r in rows], dtype=torch.float64)
    return batch
