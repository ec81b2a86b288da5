"""Plain PyTorch/transformers generation and teacher forcing, in batches.

This is the exact fp32 reference path (token-flip analysis, tests, the HF baseline of the pairs
benchmark). Large-scale pair generation uses vLLM actors instead (generate/pairs.py).
"""

from __future__ import annotations

from typing import Iterator

import torch


def _batches(seq: list, size: int) -> Iterator[tuple[int, list]]:
    for i in range(0, len(seq), size):
        yield i, seq[i:i + size]


def _left_pad(id_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in id_lists)
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for i, x in enumerate(id_lists):
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return ids, mask


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                    batch_size: int = 8, num_beams: int = 1) -> list[list[int]]:
    """Greedy answers (token ids, up to and including EOS) for each prompt; num_beams > 1 is beam search
    (deterministic too; the paper's Table 5 ablation)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    answers: list[list[int]] = []
    for _, chunk in _batches(prompt_ids, batch_size):
        ids, mask = _left_pad(chunk, pad)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=num_beams, pad_token_id=pad, eos_token_id=sorted(eos),
                             temperature=None, top_p=None, top_k=None)
        for row in out[:, ids.shape[1]:].tolist():
            ans = []
            for t in row:
                ans.append(t)
                if t in eos:
                    break
            answers.append(ans)
    return answers


@torch.no_grad()
def teacher_forced(model, prompt_ids: list[list[int]], answer_ids: list[list[int]], batch_size: int = 8,
                   pad_id: int = 0) -> Iterator[torch.Tensor]:
    """For each (prompt, answer), the fp32 logits that predict each answer token: [len(answer), vocab].

    Sequences are right-padded; a causal model's earlier positions do not see the padding.
    """
    pairs = list(zip(prompt_ids, answer_ids))
    for _, chunk in _batches(pairs, batch_size):
        seqs = [p + a for p, a in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        for i, (p, a) in enumerate(chunk):
            yield logits[i, len(p) - 1:len(p) - 1 + len(a)]
