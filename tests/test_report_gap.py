"""The report's one-sentence summary: how much of the RTN→fp gap a trained model closed."""

from qdpo_ray.evaluate.compare import gap_closed, gap_sentence


def _report():
    return {"models": {"fp": {"flip_rate": 0.0, "rouge_l": 1.0}, "rtn": {"flip_rate": 0.4, "rouge_l": 0.3},
                       "qdpo": {"flip_rate": 0.3, "rouge_l": 0.44}, "kd": {"flip_rate": 0.5, "rouge_l": 0.2}}}


def test_gap_closed_by_hand():
    g = gap_closed(_report(), "qdpo")
    assert abs(g["flip_rate"] - 0.25) < 1e-12 and abs(g["rouge_l"] - 0.2) < 1e-12
    assert gap_closed(_report(), "kd")["flip_rate"] < 0  # worse than RTN reads as a negative share


def test_sentence_names_each_trained_model():
    s = gap_sentence(_report())
    assert "**qdpo** closed 25% of the RTN→fp gap in flip rate (40.0% → 30.0%)" in s and "20% of it in ROUGE-L" in s
    assert "**kd**" in s and "fp**" not in s
