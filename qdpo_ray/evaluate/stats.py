"""How sure a held-out difference is: paired percentile bootstrap over prompts.

Two models evaluated on the same 80 prompts differ per prompt; which prompts were drawn is the noise a
reader must see before "QDPO beats KD" (one greedy answer can part from fp at token 2 or at token 40, so
ROUGE-L swings widely per prompt). Resampling prompts with replacement, the same draw for both models,
gives the 95 % interval of the difference of their means; an interval that holds 0 is no evidence of a
difference. Token-weighted metrics (the flip rate: flips / tokens over all prompts) resample (value,
weight) pairs and take Σ value / Σ weight each time.

This is the spread over prompts for fixed trained weights; the spread over training seeds is another one
(docs/results.md shows both).
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
