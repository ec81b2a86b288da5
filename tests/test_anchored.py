"""Flip-anchored pairs: the anchor maths and the anchored bookkeeping of run_pairs, without engines.
(The real-engine test is tests/test_pairs.py::test_anchored_pairs_share_prefix_and_flip_at_anchor.)"""

import pytest

from qdpo_ray.config import PairsConfig, load_config
from qdpo_ray.generate.anchored import (NO_FLIP_SUFFIX, anchor_requests, choose_anchors, complete_sets,
                                        find_flips, histogram, pair_id, q_argmax)
from qdpo_ray.generate.pairs import (_anchored_summary, _collect, _tokens, apply_filters, generation_key,
                                     make_pair)


def _lp(top, actual=None, top_lp=-0.1, actual_lp=-2.0, actual_rank=2):
    """One vLLM prompt_logprobs step with prompt_logprobs=1: top-1 and (if different) the actual token."""
    step = {top: {"logprob": top_lp, "rank": 1, "decoded_token": None}}
    if actual is not None and actual != top:
        step[actual] = {"logprob": actual_lp, "rank": actual_rank, "decoded_token": None}
    return step


def test_q_argmax_reads_answer_positions_of_prompt_logprobs():
    prompt, answer = [7, 8], [10, 11, 12]
    steps = [None, _lp(8), _lp(10), _lp(99, actual=11), _lp(12)]  # position i predicts token i
    assert q_argmax(steps, len(prompt), answer) == [10, 99, 12]
    # an exact tie with the actual token is no flip; plain floats (older vLLM dicts) work too
    tie = [None, None, {5: -0.7, 10: -0.7}, {11: -0.1}, {12: -0.2, 3: -0.1}]
    assert q_argmax(tie, 2, answer) == [10, 11, 3]
    class Logprob:  # vllm.logprobs.Logprob, as vllm.LLM returns them
        def __init__(self, logprob, rank):
            self.logprob, self.rank = logprob, rank

    objs = [None, None, {10: Logprob(-0.2, 1)}, {11: Logprob(-3.0, 4), 42: Logprob(-0.3, 1)}]
    assert q_argmax(objs, 2, [10, 11]) == [10, 42]
    with pytest.raises(ValueError, match="prompt_logprobs"):
        q_argmax([None, None, {}], 2, [10])


def test_find_flips():
    assert find_flips([1, 2, 3, 4], [1, 9, 3, 8]) == [1, 3]
    assert find_flips([1, 2], [1, 2]) == []


def test_choose_anchors_first_flip_always_seeded_rest():
    flips = [3, 5, 8, 13, 21, 34]
    a = choose_anchors(flips, 3, "random", "0:p1")
    assert a[0] == 3 and len(a) == 3 and a == sorted(a) and set(a) <= set(flips)
    assert choose_anchors(flips, 3, "random", "0:p1") == a  # seeded: the same prompt gets the same anchors
    assert len({tuple(choose_anchors(flips, 3, "random", f"0:p{i}")) for i in range(20)}) > 1
    assert choose_anchors(flips, 10, "random", 1) == flips  # fewer flips than anchors: all of them
    assert choose_anchors(flips, 1, "random", 1) == [3]
    assert choose_anchors([], 4, "random", 1) == []


def test_choose_anchors_by_margin_prefers_confident_fp():
    flips = [2, 4, 6, 8]
    gaps = [0.0] * 10
    gaps[2], gaps[4], gaps[6], gaps[8] = 0.01, 0.5, 3.0, 1.0
    assert choose_anchors(flips, 3, "margin", 0, gaps) == [2, 6, 8]  # first flip kept even at a tiny gap
    gaps[6] = None  # unknown gap goes last
    assert choose_anchors(flips, 3, "margin", 0, gaps) == [2, 4, 8]
    with pytest.raises(ValueError):
        choose_anchors(flips, 2, "best", 0)


def test_anchor_requests_build_prefix_and_continuation():
    row = {"id": "p1", "prompt_text": "Q:", "prompt_token_ids": [1, 2], "chosen_token_ids": [10, 11, 12, 13, 14],
           "chosen_fp_gaps": [0.1, 0.2, 0.3, 0.4, 0.5]}
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    reqs = anchor_requests(row, [0, 3], 2, decode)
    assert [r["id"] for r in reqs] == ["p1@0", "p1@3"] and all(r["source_id"] == "p1" for r in reqs)
    assert reqs[0]["prompt_token_ids"] == [1, 2] and reqs[0]["prompt_text"] == "Q:"
    assert reqs[1]["prompt_token_ids"] == [1, 2, 10, 11, 12] and reqs[1]["prompt_text"] == "Q:<10><11><12>"
    assert reqs[1]["chosen_token_ids"] == [13, 14] and reqs[1]["chosen"] == "<13><14>"
    assert reqs[1]["chosen_fp_gaps"] == [0.4, 0.5] and reqs[1]["anchor"] == 3
    assert anchor_requests(row, [4], 3, decode)[0]["chosen_token_ids"] == [14]  # y ends before k + L


def _pair(pid, k, chosen, rejected, anchors, gaps=None, flips=None, ylen=10):
    req = {"id": pair_id(pid, k), "source_id": pid, "anchor": k, "prompt_text": "x", "prompt_token_ids": [1] + [5] * k,
           "chosen": "c", "chosen_token_ids": chosen, "chosen_fp_gaps": gaps or [1.0] * len(chosen)}
    return {**make_pair({**req, "rejected": "r", "rejected_token_ids": rejected}), "source_id": pid, "anchor": k,
            "anchors": anchors, "answer_flips": flips if flips is not None else anchors, "answer_len": ylen}


def _placeholder(pid, ylen=10):
    r = make_pair({"id": pid + NO_FLIP_SUFFIX, "prompt_text": "x", "prompt_token_ids": [1], "chosen": "",
                   "chosen_token_ids": [], "rejected": "", "rejected_token_ids": []})
    return {**r, "source_id": pid, "anchor": None, "anchors": [], "answer_flips": [], "answer_len": ylen}


def test_make_pair_on_anchored_row_diverges_at_zero():
    p = _pair("a", 3, [4, 5], [6, 5], [3], gaps=[2.5, 0.1])
    assert p["first_divergence"] == 0 and p["divergence_fp_gap"] == 2.5 and p["divergence_tokens"] == [4, 6]


def test_complete_sets_resume_bookkeeping():
    raw = [_pair("a", 1, [4], [5], [1, 6]), _pair("a", 6, [4], [5], [1, 6]),  # complete
           _pair("b", 2, [4], [5], [2, 7]),                                      # half written: not done
           _placeholder("c"),                                                   # no flips: done, no pairs
           _pair("a", 1, [4], [5], [1, 6])]                                      # a retried batch repeats an id
    done = complete_sets(raw)
    assert set(done) == {"a", "c"}
    assert [r["anchor"] for r in done["a"]] == [1, 6] and done["c"][0]["anchor"] is None
    rows = [{"id": i} for i in ("c", "b", "a", "z")]
    pairs, missing, stray, groups = _collect(raw, rows, anchored=True)
    assert [r["id"] for r in pairs] == ["a@1", "a@6"] and missing == {"b", "z"} and stray == {"b@2"}
    assert _tokens(pairs, groups) == 10 + 10 + 2  # each answer once + the rejected continuations
    assert _tokens(pairs, groups, {"c"}) == 10


def test_filters_drop_and_count_anchored_pairs_that_are_no_flip():
    cfg = PairsConfig(mode="anchored", divergence_window=(0, 5), min_fp_gap=0.5)
    rows = [_pair("a", 1, [4, 5], [6, 5], [1], gaps=[1.0, 1.0]),   # kept
            _pair("b", 2, [4, 5], [4, 7], [2]),                    # same first token: not a flip
            _pair("c", 9, [4], [6], [9]),                          # anchor outside the window
            _pair("d", 3, [4], [6], [3], gaps=[0.1]),              # fp unsure at the anchor
            _pair("e", 0, [4], [4], [0])]                          # identical: also not a flip
    kept, removed = apply_filters(rows, cfg)
    assert [r["source_id"] for r in kept] == ["a"]
    assert removed == {"not_a_flip": 2, "identical": 0, "divergence_window": 1, "min_fp_gap": 1}
    assert "not_a_flip" not in apply_filters([], PairsConfig())[1]  # natural summaries unchanged


def test_anchored_summary_fields():
    raw = [_pair("a", 1, [4, 5], [6], [1, 6], flips=[1, 2, 6]), _pair("a", 6, [4], [5, 6], [1, 6], flips=[1, 2, 6]),
           _placeholder("c", ylen=6)]
    pairs, _, _, groups = _collect(raw, [{"id": "a"}, {"id": "c"}], anchored=True)
    s = _anchored_summary(groups, pairs, PairsConfig(mode="anchored", continuation_len=2))
    assert s["anchors_per_prompt_mean"] == 1.0 and s["answers_without_flips"] == 1
    assert s["flips_per_answer_mean"] == 1.5 and s["flip_rate"] == 3 / 16
    assert s["flip_position_histogram"] == {"0": 0, "1": 1, "2-3": 1, "4-7": 1}
    assert s["anchor_position_histogram"] == {"0": 0, "1": 1, "2-3": 0, "4-7": 1}
    assert s["flips_per_answer_histogram"] == {"0": 1, "1": 0, "2-3": 1}
    assert s["mean_chosen_len"] == 1.5 and s["mean_rejected_len"] == 1.5 and s["continuation_len"] == 2


def test_histogram_buckets():
    assert histogram([]) == {}
    assert histogram([0, 1, 2, 3, 4, 9]) == {"0": 1, "1": 1, "2-3": 2, "4-7": 1, "8-15": 1}


def test_generation_key_natural_unchanged_anchored_keyed():
    nat = generation_key(load_config(None, []), "w4")
    assert "mode" not in nat and "continuation_len" not in nat  # natural runs resume as before
    anc = generation_key(load_config(None, ["pairs.mode=anchored", "pairs.continuation_len=1"]), "w4")
    assert anc["mode"] == "anchored" and anc["continuation_len"] == 1 and anc["anchor_by"] == "random"


def test_config_fields():
    c = PairsConfig()
    assert (c.mode, c.anchors_per_prompt, c.anchor_by, c.continuation_len) == ("natural", 4, "random", 4)
    with pytest.raises(Exception):
        PairsConfig(mode="dense")
    with pytest.raises(Exception):
        PairsConfig(continuation_len=0)
