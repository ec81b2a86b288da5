"""Are the pairs what QDPO assumes? y_w must be the fp model's greedy answer and y_l π_q's.

vLLM engines compute in bf16/fp16 while training's reference is the fp32 (fake-quant) model, so an
engine's greedy answer can leave the fp32 model's greedy path. Teacher-forcing each answer through the
fp32 model tells exactly: an answer is that model's greedy answer iff every token is the argmax given
its prefix. `check_pairs` scores a seeded sample of pairs on a Ray Data actor pool (fp32 fp model for
chosen, the fp32 de-quantized W4 checkpoint — π_q itself — for rejected) and returns per-pair
agreement and the rates that go into the pairs' summary.json.

Where the engine pool runs on GPUs (`pairs.engine.gpus_per_actor > 0`) each scorer takes one whole GPU
(an fp32 7B model is 27 GB; on CPUs its forward over a sample takes hours) and computes in true fp32:
TF32 matmuls and convolutions off (`exact_fp32`), so the check stays exact. Otherwise it runs on CPUs.
"""

from __future__ import annotations

import random
from typing import Any

import torch


@torch.no_grad()
def greedy_agreement(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int = 0
                     ) -> list[tuple[int, int]]:
    """(tokens equal to the model's argmax given their prefix, answer length) per (prompt, answer)."""
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.cpu()
    out = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if not a:
            out.append((0, 0))
            continue
        pred = logits[i, len(p) - 1:len(p) - 1 + len(a)].argmax(-1)
        out.append((int((pred == torch.tensor(a)).sum()), len(a)))
    return out


def exact_fp32() -> dict[str, bool]:
    """Make this process's CUDA fp32 matmuls and convolutions true fp32 (no TF32, whose 10-bit mantissa
    would move argmaxes the check is about); returns the flags as they now are."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision_highest": torch.get_float32_matmul_precision() == "highest"}


def scorer_resources(cpus: float, engine_gpus: float) -> dict[str, float]:
    """Ray resources of one scorer actor: one whole GPU when the engine pool runs on GPUs (the fp32 model
    does not fit a fractional engine share), else `cpus` CPUs only."""
    if engine_gpus > 0:
        return {"num_cpus": 1.0, "num_gpus": 1.0}
    return {"num_cpus": cpus, "num_gpus": 0.0}


class _Scorer:
    """Ray Data actor: one fp32 model, teacher-forced argmax agreement of one answer column, on the
    actor's GPU when it has one."""

    def __init__(self, model_dir: str, column: str, pad_id: int, micro: int = 8):
        from qdpo_ray.models import load_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            exact_fp32()
        self.model = load_model(model_dir, dtype="float32").to(self.device)
        self.column, self.pad_id, self.micro = column, pad_id, micro

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        n = len(batch["id"])
        prompts = [np.asarray(batch["prompt_token_ids"][i]).tolist() for i in range(n)]
        answers = [np.asarray(batch[self.column][i]).tolist() for i in range(n)]
        res: list[tuple[int, int]] = []
        for s in range(0, n, self.micro):
            res += greedy_agreement(self.model, prompts[s:s + self.micro], answers[s:s + self.micro], self.pad_id)
        return {"id": batch["id"], "match": np.array([m for m, _ in res]), "len": np.array([k for _, k in res])}


def _score(model_dir: str, column: str, rows: list[dict[str, Any]], pad_id: int, cpus: float,
           engine_gpus: float = 0.0) -> dict[str, tuple[int, int]]:
    import ray.data

    slim = [{"id": r["id"], "prompt_token_ids": list(r["prompt_token_ids"]), column: list(r[column])} for r in rows]
    ds = ray.data.from_items(slim).map_batches(
        _Scorer, fn_constructor_kwargs={"model_dir": model_dir, "column": column, "pad_id": pad_id},
        batch_size=32, compute=ray.data.ActorPoolStrategy(size=1), **scorer_resources(cpus, engine_gpus))
    return {r["id"]: (int(r["match"]), int(r["len"])) for r in ds.take_all()}


def check_pairs(rows: list[dict[str, Any]], fp_dir: str, w4_dir: str, sample: int | None, seed: int,
                pad_id: int = 0, cpus: float = 1.0, engine_gpus: float = 0.0
                ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(per-pair fidelity columns for the checked ids, summary) on `sample` pairs (None = all);
    `engine_gpus`: the pairs engines' gpus_per_actor (> 0: the scorers run on a GPU each)."""
    rows = [r for r in rows if not r["identical"]]
    if sample is not None and len(rows) > sample:
        rows = random.Random(seed).sample(rows, sample)
    if not rows:
        return {}, {"checked": 0}
    chosen = _score(fp_dir, "chosen_token_ids", rows, pad_id, cpus, engine_gpus)
    rejected = _score(w4_dir, "rejected_token_ids", rows, pad_id, cpus, engine_gpus)
    per = {}
    for r in rows:
        (cm, cl), (rm, rl) = chosen[r["id"]], rejected[r["id"]]
        per[r["id"]] = {"chosen_is_fp_greedy": cm == cl, "rejected_is_q_greedy": rm == rl,
                        "chosen_fp_agreement": cm / max(1, cl), "rejected_q_agreement": rm / max(1, rl)}
    n = len(per)
    summary = {
        "checked": n,
        "chosen_is_fp_greedy_rate": sum(v["chosen_is_fp_greedy"] for v in per.values()) / n,
        "rejected_is_q_greedy_rate": sum(v["rejected_is_q_greedy"] for v in per.values()) / n,
        "chosen_token_agreement": sum(m for m, _ in chosen.values()) / max(1, sum(k for _, k in chosen.values())),
        "rejected_token_agreement": sum(m for m, _ in rejected.values()) / max(1, sum(k for _, k in rejected.values())),
        "reference": "fp32 teacher forcing: fp model (chosen), de-quantized W4 checkpoint = π_q (rejected)",
    }
    return per, summary
