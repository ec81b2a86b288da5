"""Pair construction and filtering, without engines."""

from qdpo_ray.config import PairsConfig
from qdpo_ray.generate.pairs import apply_filters, first_divergence, make_pair, part_name, top2_gaps


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # a strict prefix diverges where it stops
    assert first_divergence([], [4]) == 0


def test_top2_gaps_from_vllm_logprobs():
    steps = [{5: {"logprob": -0.1}, 7: {"logprob": -2.5}}, {3: {"logprob": -0.5}}, {1: -1.0, 2: -0.25, 9: -3.0}]
    gaps = top2_gaps(steps)
    assert abs(gaps[0] - 2.4) < 1e-9 and gaps[1] is None and abs(gaps[2] - 0.75) < 1e-9


def _row(i, chosen, rejected, gaps=None):
    return make_pair({"id": i, "prompt_text": f"p{i}", "prompt_token_ids": [1], "chosen": "c", "rejected": "r",
                      "chosen_token_ids": chosen, "rejected_token_ids": rejected,
                      "chosen_fp_gaps": gaps or [0.0] * len(chosen)})


def test_make_pair_fields():
    r = _row("a", [1, 2, 3], [1, 4, 3], [0.5, 0.01, 2.0])
    assert (r["first_divergence"], r["identical"], r["divergence_fp_gap"], r["divergence_tokens"]) == (1, False, 0.01, [2, 4])
    same = _row("b", [1, 2], [1, 2])
    assert same["identical"] and same["first_divergence"] is None and same["divergence_fp_gap"] is None


def test_filters_count_each_rule():
    rows = [_row("a", [1], [1]), _row("b", [1, 2], [1, 3], [1.0, 0.05]), _row("c", [5], [6], [2.0]),
            _row("d", [1, 2, 3, 4], [1, 2, 3, 9], [1, 1, 1, 3.0])]
    kept, removed = apply_filters(rows, PairsConfig())
    assert [r["id"] for r in kept] == ["b", "c", "d"] and removed["identical"] == 1
    kept, removed = apply_filters(rows, PairsConfig(drop_identical=False, divergence_window=(0, 1)))
    assert [r["id"] for r in kept] == ["a", "b", "c"] and removed == {"identical": 0, "divergence_window": 1, "min_fp_gap": 0}
    kept, removed = apply_filters(rows, PairsConfig(min_fp_gap=0.5))
    assert [r["id"] for r in kept] == ["c", "d"] and removed["min_fp_gap"] == 1


def test_part_name_is_order_independent():
    assert part_name(["b", "a"]) == part_name(["a", "b"]) != part_name(["a", "c"])
