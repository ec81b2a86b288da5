"""How sure a held-out difference is: paired percentile bootstrap over prompts.

Two models evaluated on the same 80 prompts differ per prompt; which prompts were drawn is the noise a
reader must see before "QDPO beats KD" (one greedy answer can part from fp at token 2 or at token 40, so
ROUGE-L swings widely per prompt). Resampling prompts with replacement, the same draw for both models,
gives the 95 % interval of the difference of their means; an interval that holds 0 is no evidence of a
difference. Token-weighted metrics (the flip rate: flips / tokens over all prompts) resample (value,
weight) pairs and take Σ value / Σ weight each time.

This is the spread over prompts for fixed trained weights; the spread over training seeds is another one
(docs/results.md shows both). A configuration trained with several seeds enters as their per-prompt mean
(`NAME=RUN:LABEL,RUN:LABEL`), so one seed's luck weighs less in the comparison; the interval is still over
prompts only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, *, resamples: int = 4000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): Σ values / Σ weights (the mean without weights) over the items and its
    percentile-bootstrap interval at `level`, the items drawn with replacement `resamples` times."""
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if v.ndim != 1 or v.shape != w.shape or not len(v):
        raise ValueError(f"bootstrap_ci: {len(v)} values and {len(w)} weights; need as many, at least one")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    stats = v[idx].sum(1) / np.maximum(w[idx].sum(1), 1e-300)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(v.sum() / w.sum()), float(lo), float(hi)


def paired_difference(a: Sequence[float], b: Sequence[float], weights: Sequence[float] | None = None,
                      **kw) -> tuple[float, float, float]:
    """`bootstrap_ci` of a − b per item (same prompts, same draw for both models)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} items; both models need the same prompts")
    return bootstrap_ci([x - y for x, y in zip(a, b)], weights, **kw)


def interval(d: Sequence[float], fmt: str = "+.3f", scale: float = 1.0) -> str:
    """'estimate [low, high]' of a `bootstrap_ci` result, each × `scale` (100: points) in format `fmt`."""
    return f"{scale * d[0]:{fmt}} [{scale * d[1]:{fmt}}, {scale * d[2]:{fmt}}]"


def differences(per_label: dict[str, dict[str, list | None]], tokens: Sequence[float] | None, **kw) -> list[dict]:
    """Each quantized model against every one listed before it (the fp reference is not one: its scores are
    what the others are measured against): {"model", "against", "flip_rate" (token-weighted by `tokens`; None
    where either model has no per-prompt flips), "rouge_l"}, each with its 95 % paired interval."""
    from itertools import combinations

    out = []
    for b, a in combinations([m for m in per_label if m != "fp"], 2):
        pa, pb = per_label[a], per_label[b]
        flips = (paired_difference(pa["flips"], pb["flips"], tokens, **kw)
                 if pa.get("flips") is not None and pb.get("flips") is not None else None)
        out.append({"model": a, "against": b, "flip_rate": flips,
                    "rouge_l": paired_difference(pa["rouge_l"], pb["rouge_l"], **kw)})
    return out


def differences_table(diffs: list[dict]) -> list[str]:
    """Markdown rows of `differences`: flip rate in points, ROUGE-L to fp."""
    return ["| model − against | flip rate (points) | ROUGE-L to fp |", "|---|---|---|"] + [
        f"| {d['model']} − {d['against']} | {interval(d['flip_rate'], '+.1f', 100) if d['flip_rate'] else '—'} | "
        f"{interval(d['rouge_l'])} |" for d in diffs]


def load_run_model(spec: str) -> tuple[str, dict]:
    """`RUN_DIR:LABEL` → (label, {"ids", "fp", "rouge_l", "flips" or None, "tokens" or None}) of one model of a
    `qdpo-ray evaluate` run: per-prompt values from results.json where the run kept them, else ROUGE-L
    recomputed from samples.jsonl (runs made before results.json had them; no per-prompt flips then)."""
    import json
    from pathlib import Path

    from qdpo_ray.text_metrics import rouge_l

    run, sep, label = spec.rpartition(":")
    samples, results = Path(run, "samples.jsonl"), Path(run, "results.json")
    if not sep or not samples.is_file():
        raise SystemExit(f"{spec!r}: expected RUN_DIR:LABEL with RUN_DIR/samples.jsonl from `qdpo-ray evaluate`")
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    if label not in rows[0]:
        raise SystemExit(f"{spec!r}: no model {label!r} in {samples} (models: "
                         f"{', '.join(k for k in rows[0] if k not in ('id', 'prompt'))})")
    per = json.loads(results.read_text()).get("per_prompt", {}) if results.is_file() else {}
    if label in per:
        return label, {"ids": per["ids"], "fp": [r["fp"] for r in rows], "rouge_l": per[label]["rouge_l"],
                       "flips": per[label]["flips"], "tokens": per["tokens"]}
    return label, {"ids": [r["id"] for r in rows], "fp": [r["fp"] for r in rows],
                   "rouge_l": [rouge_l(r[label], r["fp"]) for r in rows], "flips": None, "tokens": None}


def same_prompts(a: dict, b: dict) -> bool:
    """Whether two loaded models were scored on the same prompts against the same fp answers (pairable)."""
    return a["ids"] == b["ids"] and a["fp"] == b["fp"]


def load_spec(spec: str) -> tuple[str, dict]:
    """`RUN_DIR:LABEL`, or `NAME=RUN_DIR:LABEL,RUN_DIR:LABEL[,...]`: the per-prompt mean of those models (one
    configuration's seeds: ROUGE-L and flips averaged per prompt; flips None unless every run has them)."""
    name, sep, members = spec.partition("=")
    if not sep:
        return load_run_model(spec)
    runs = [load_run_model(m)[1] for m in members.split(",") if m]
    if not name or len(runs) < 2:
        raise SystemExit(f"{spec!r}: a mean needs NAME=RUN_DIR:LABEL,RUN_DIR:LABEL (two runs or more)")
    first = runs[0]
    if not all(same_prompts(r, first) for r in runs):
        raise SystemExit(f"{spec!r}: its runs were evaluated on other prompts or fp answers; a mean needs the same")
    flips = None if any(r["flips"] is None for r in runs) else np.mean([r["flips"] for r in runs], 0).tolist()
    return name, {"ids": first["ids"], "fp": first["fp"], "rouge_l": np.mean([r["rouge_l"] for r in runs], 0).tolist(),
                  "flips": flips, "tokens": first["tokens"] if flips is not None else None}


def main(argv: list[str] | None = None) -> None:
    """python -m qdpo_ray.evaluate.stats RUN_DIR:LABEL RUN_DIR:LABEL [...]: paired differences of models
    evaluated in separate runs on the same prompts (each against those before it), with 95 % intervals.
    NAME=RUN_DIR:LABEL,RUN_DIR:LABEL stands for the per-prompt mean of several runs (seeds)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m qdpo_ray.evaluate.stats", description=main.__doc__)
    ap.add_argument("models", nargs="+", metavar="RUN_DIR:LABEL | NAME=RUN_DIR:LABEL,RUN_DIR:LABEL")
    ap.add_argument("--resamples", type=int, default=4000)
    a = ap.parse_args(argv)
    models = [load_spec(s) for s in a.models]
    first = models[0][1]
    for spec, (_, m) in zip(a.models, models):
        if not same_prompts(m, first):
            raise SystemExit(f"{spec!r}: other prompts or other fp answers than {a.models[0]!r}; paired differences "
                             "need the same evaluation prompts and fp model")
    tokens = next((m["tokens"] for _, m in models if m["tokens"] is not None), None)
    print("\n".join(differences_table(differences(dict(models), tokens, resamples=a.resamples))))


if __name__ == "__main__":
    main()
