"""Text similarity shared by the stages that compare answers (evaluate, serve).

It lives at the package root, below every stage, because the stages only import downwards: serve may not
import evaluate, yet both must report the same ROUGE-L for the same two answers.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    # Building the scorer loads its tokenizer; evaluate calls rouge_l once per prompt and model.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of `candidate` against `reference` (symmetric: F1 of the longest common subsequence)."""
    if candidate == reference:
        # rouge-score gives 0 when no word survives its tokenizer (empty, punctuation only); equal answers
        # must still read as a perfect match.
        return 1.0
    return _scorer().score(reference, candidate)["rougeL"].fmeasure
