"""Text similarity shared by the stages that compare answers (evaluate, serve).

It lives at the package root, below every stage, because the stages only import downwards: serve may not
import evaluate, yet both must report the same ROUGE-L for the same two answers.
"""

from __future__ import annotations

from functools import lru_cache


ROUGE = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=1)
def _scorer():
    # Building the scorer loads its tokenizer; evaluate scores once per prompt and model.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=False)


def rouge_scores(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of `candidate` against `reference`."""
    if candidate == reference:
        # rouge-score gives 0 when no word survives its tokenizer (empty, punctuation only); equal answers
        # must still read as a perfect match.
        return {m: 1.0 for m in ROUGE}
    s = _scorer().score(reference, candidate)
    return {m: float(s[m].fmeasure) for m in ROUGE}


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of `candidate` against `reference` (symmetric: F1 of the longest common subsequence)."""
    return rouge_scores(candidate, reference)["rougeL"]
