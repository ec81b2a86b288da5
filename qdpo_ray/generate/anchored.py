"""Flip-anchored pairs (`pairs.mode: anchored`): the anchor maths, as small pure functions.

Natural pairs put two whole greedy answers side by side; at W4 they part after a token or two, so the
rejected answer is soon a different text and DPO learns little about the later flips. Anchored pairs are
made *at* π_q's flips on the fp answer instead:

    y            = the fp model's greedy answer to x                        (fp engine, as for natural pairs)
    argmax_q[j]  = π_q's argmax given x + y[:j], teacher-forced              (W4 engine, prompt log-probs)
    flips        = [j : argmax_q[j] != y[j]]
    anchors      = the first flip + up to anchors_per_prompt - 1 others     (seeded random, or by fp margin)
    pair at k    : prompt' = x + y[:k],  chosen = y[k:k+L],  rejected = π_q's greedy L tokens from prompt'

By construction chosen and rejected differ at their first token (first_divergence 0): rejected[0] is
π_q's argmax at k and chosen[0] = y[k] is not. A pair whose rejected first token equals chosen's (the
engine's generation and its teacher-forced pass disagreeing on a near-tie) is not a flip; `run_pairs`
drops and counts those.

The Ray Data / vLLM glue that calls these is `qdpo_ray.generate.pairs._PiQAnchors`.
"""

from __future__ import annotations

import random
from typing import Any, Callable

NO_FLIP_SUFFIX = "@-"  # id of the one placeholder row of an answer without flips (no pairs, but done)


def pair_id(prompt_id: str, k: int) -> str:
    return f"{prompt_id}@{k}"


def q_argmax(prompt_logprobs: list[dict | None], prompt_len: int, answer: list[int]) -> list[int]:
    """π_q's argmax at every answer position, from vLLM's `prompt_logprobs` over prompt + answer.

    `prompt_logprobs[i]` is the distribution of token i given tokens < i (None at i = 0), as
    {token_id: Logprob(logprob=..., rank=...)} (or such dicts, or plain floats) holding at least the top-1
    and the actual token (`prompt_logprobs=1`). An exact tie with the actual token counts as no flip."""
    out = []
    for j, actual in enumerate(answer):
        step = prompt_logprobs[prompt_len + j] or {}
        lps = {int(t): float(v["logprob"] if isinstance(v, dict) else getattr(v, "logprob", v))
               for t, v in step.items()}
        if not lps:
            raise ValueError(f"no prompt log-probs at position {prompt_len + j} (was prompt_logprobs set?)")
        best = max(lps.values())
        out.append(actual if lps.get(actual) == best else max(lps, key=lambda t: (lps[t], -t)))
    return out


def find_flips(answer: list[int], argmax: list[int]) -> list[int]:
    """Positions j where π_q, teacher-forced on the answer, would not emit answer[j]."""
    return [j for j, (a, q) in enumerate(zip(answer, argmax)) if a != q]


def choose_anchors(flips: list[int], n: int, by: str = "random", seed: str | int = 0,
                   fp_gaps: list[float | None] | None = None) -> list[int]:
    """The first flip plus up to n - 1 others, sorted. `by="random"`: a seeded sample (seed it per
    prompt, e.g. f"{run seed}:{prompt id}", so the choice does not depend on batching);
    `by="margin"`: the flips with the largest fp top-1/top-2 gap (the fp model was confident there;
    unknown gaps last, ties by position)."""
    if not flips or n < 1:
        return []
    first, rest = flips[0], list(flips[1:])
    if by == "random":
        others = random.Random(str(seed)).sample(rest, min(n - 1, len(rest)))
    elif by == "margin":
        gaps = fp_gaps or []

        def gap(j: int) -> float:
            g = gaps[j] if j < len(gaps) else None
            return float("-inf") if g is None or g != g else float(g)  # unknown (None/NaN) last

        others = sorted(rest, key=lambda j: (-gap(j), j))[:n - 1]
    else:
        raise ValueError(f"anchor_by must be 'random' or 'margin', got {by!r}")
    return sorted([first, *others])


def anchor_requests(row: dict[str, Any], anchors: list[int], length: int,
                    decode: Callable[[list[int]], str]) -> list[dict[str, Any]]:
    """One row per anchor k, ready for π_q's continuation: prompt' ids = prompt ids + y[:k], its text =
    prompt text + decoded y[:k], chosen = y[k:k+L] (and the fp gaps over it: gaps[0] is the gap at k).

    `row` holds id, prompt_text, prompt_token_ids, chosen_token_ids (= y) and chosen_fp_gaps."""
    y, p = [int(t) for t in row["chosen_token_ids"]], [int(t) for t in row["prompt_token_ids"]]
    raw_gaps = row.get("chosen_fp_gaps")  # Ray Data may hand rows over as numpy arrays (nulls as NaN)
    gaps = [None if g is None or g != g else float(g) for g in ([] if raw_gaps is None else raw_gaps)]
    out = []
    for k in map(int, anchors):
        chosen = y[k:k + length]
        out.append({"id": pair_id(row["id"], k), "source_id": row["id"], "anchor": k,
                    "prompt_text": row["prompt_text"] + decode(y[:k]), "prompt_token_ids": p + y[:k],
                    "chosen": decode(chosen), "chosen_token_ids": chosen, "chosen_fp_gaps": gaps[k:k + length]})
    return out


def is_flip_pair(pair: dict[str, Any]) -> bool:
    """An anchored pair is a flip iff its two continuations differ at their first token."""
    return pair["first_divergence"] == 0


def complete_sets(raw: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group raw anchored rows by prompt and keep the prompts whose generation finished: the no-flip
    placeholder row, or a row for every anchor of the answer's anchor set (a batch may have split a
    prompt's anchors over two part files, and a crash may have left one of them unwritten).
    Returns {prompt id: its rows in anchor order (the placeholder alone for an answer without flips)}."""
    by_prompt: dict[str, dict[str, dict[str, Any]]] = {}
    for r in raw:
        by_prompt.setdefault(r["source_id"], {}).setdefault(r["id"], r)  # a retried batch may repeat an id
    done: dict[str, list[dict[str, Any]]] = {}
    for pid, rows in by_prompt.items():
        if pid + NO_FLIP_SUFFIX in rows:
            done[pid] = [rows[pid + NO_FLIP_SUFFIX]]
            continue
        for r in rows.values():
            ids = [pair_id(pid, k) for k in r["anchors"]]
            if all(i in rows for i in ids):
                done[pid] = [rows[i] for i in ids]
                break
    return done


def histogram(positions: list[int]) -> dict[str, int]:
    """Counts in power-of-two buckets: 0, 1, 2-3, 4-7, 8-15, ... (keys in order, empty buckets kept)."""
    if not positions:
        return {}
    out: dict[str, int] = {}
    lo = 0
    while lo <= max(positions):
        hi = 0 if lo == 0 else 2 * lo - 1
        out[str(lo) if lo == hi else f"{lo}-{hi}"] = sum(lo <= p <= hi for p in positions)
        lo = 1 if lo == 0 else 2 * lo
    return out
