"""Token-flip analysis (paper §3.1, Fig. 1 and 3).

For each prompt the fp model decodes greedily; that answer is then teacher-forced through the fp model
and through π_q (the RTN model). At every answer position we record the fp top-1/top-2 probability gap
and π_q's top-1; a *flip* is a position where π_q's argmax differs from the fp token. Teacher forcing
keeps both models on the same prefix, so each flip is counted where quantization alone moved the argmax
(the paper's T_F), not as a consequence of an earlier divergence.

Outputs in `out/`: summary.json, tokens.parquet (one row per answer token), margins.png.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from qdpo_ray.config import RunConfig, dump_config
from qdpo_ray.data import format_prompt, load_prompts
from qdpo_ray.generate.fp_answers import fp_greedy_answers
from qdpo_ray.generate.hf import teacher_forced
from qdpo_ray.io import atomic_path, atomic_write_json
from qdpo_ray.models import load_model, load_tokenizer
from qdpo_ray.quant.fake_quant import quantize_model_rtn

log = logging.getLogger(__name__)


def top2_margin(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-1 id, top-1 prob, top-1 − top-2 prob) per row of [T, vocab] logits."""
    probs = logits.float().softmax(-1)
    top = probs.topk(2, dim=-1)
    return top.indices[:, 0], top.values[:, 0], top.values[:, 0] - top.values[:, 1]


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def summarize(rows: list[dict[str, Any]], prompt_ids: list[str]) -> dict[str, Any]:
    """Flip statistics from per-token rows (pure: testable without a model)."""
    first: dict[str, int | None] = {pid: None for pid in prompt_ids}
    for r in rows:
        if r["flip"] and first[r["id"]] is None:
            first[r["id"]] = r["position"]
    flipped = [r["margin"] for r in rows if r["flip"]]
    unflipped = [r["margin"] for r in rows if not r["flip"]]
    firsts = [v for v in first.values() if v is not None]
    return {
        "n_prompts": len(prompt_ids),
        "n_tokens": len(rows),
        "n_flips": len(flipped),
        "flip_rate": len(flipped) / len(rows) if rows else 0.0,
        "prompts_with_flip": len(firsts),
        "mean_first_flip_position": _mean([float(v) for v in firsts]),
        "first_flip_positions": [first[p] for p in prompt_ids],
        "mean_margin_flipped": _mean(flipped),
        "mean_margin_unflipped": _mean(unflipped),
        "share_margin_below_0.1": {
            "flipped": _mean([float(m < 0.1) for m in flipped]),
            "unflipped": _mean([float(m < 0.1) for m in unflipped]),
        },
    }


def plot_margins(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    from qdpo_ray.plots import pyplot, save_figure

    plt = pyplot()

    flipped = [r["margin"] for r in rows if r["flip"]]
    unflipped = [r["margin"] for r in rows if not r["flip"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [i / 40 for i in range(41)]
    ax.hist(unflipped, bins=bins, density=True, alpha=0.6, label=f"unflipped ({len(unflipped)})", color="tab:blue")
    if flipped:
        ax.hist(flipped, bins=bins, density=True, alpha=0.6, label=f"flipped ({len(flipped)})", color="tab:red")
    ax.set_xlabel("fp top-1 − top-2 probability")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def run_flips(cfg: RunConfig) -> dict[str, Any]:
    """Run the analysis described by `cfg` (model, quant, prompts, flips) and write `cfg.out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prompts = load_prompts(cfg.prompts)
    tok = load_tokenizer(cfg.model)
    fp = load_model(cfg.model, dtype="float32")
    ids = [format_prompt(tok, p, cfg.model) for p in prompts.prompts]
    log.info("decoding %d prompts with the fp model", len(ids))
    answers = fp_greedy_answers(fp, tok, ids, cfg.flips.max_new_tokens, cfg.flips.batch_size, cfg.model)
    q = quantize_model_rtn(copy.deepcopy(fp), cfg.quant)
    pad = tok.pad_token_id or 0

    rows: list[dict[str, Any]] = []
    fp_logits = teacher_forced(fp, ids, answers, cfg.flips.batch_size, pad)
    q_logits = teacher_forced(q, ids, answers, cfg.flips.batch_size, pad)
    for prow, ans, lf, lq in zip(prompts.rows, answers, fp_logits, q_logits):
        fp_top, fp_p1, margin = top2_margin(lf)
        q_top, _, q_margin = top2_margin(lq)
        for t, tok_id in enumerate(ans):
            qt = int(q_top[t])
            rows.append({
                "id": prow["id"], "position": t, "token_id": tok_id, "token": tok.decode([tok_id]),
                "fp_top1_prob": float(fp_p1[t]), "margin": float(margin[t]),
                "q_top1_id": qt, "q_top1": tok.decode([qt]), "q_margin": float(q_margin[t]),
                "flip": qt != tok_id,
            })

    summary = summarize(rows, [r["id"] for r in prompts.rows])
    summary.update({
        "model": cfg.model.name, "quant": cfg.quant.label, "quant_config": cfg.quant.model_dump(mode="json"),
        "prompts_source": cfg.prompts.source, "skipped_empty_prompts": prompts.skipped_empty,
        "max_new_tokens": cfg.flips.max_new_tokens, "wall_s": round(time.time() - t0, 1),
    })
    with atomic_path(out / "tokens.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    plot_margins(rows, out / "margins.png",
                 f"{cfg.quant.label}: flip rate {summary['flip_rate']:.1%} ({summary['n_flips']}/{summary['n_tokens']})")
    atomic_write_json(out / "summary.json", summary)
    dump_config(cfg, out / "config.yaml")
    return summary
