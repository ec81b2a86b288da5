"""Paired bootstrap intervals of held-out differences (evaluate/stats.py) and the evaluation's table of them."""

import pytest

from qdpo_ray.evaluate.compare import differences, results_table
from qdpo_ray.evaluate.stats import bootstrap_ci, paired_difference


def test_constant_values_have_a_zero_width_interval():
    assert bootstrap_ci([0.25] * 7) == (0.25, 0.25, 0.25)


def test_weighted_estimate_is_the_ratio_and_the_interval_stays_within_the_extremes():
    est, lo, hi = bootstrap_ci([1.0, 3.0], [2.0, 2.0], resamples=2000)
    assert est == 1.0  # Σ values / Σ weights, not the mean of the ratios
    assert 0.5 <= lo < est < hi <= 1.5  # all-first-item 2/4, all-second-item 6/4
    assert bootstrap_ci([1.0, 3.0], [2.0, 2.0], resamples=2000) == (est, lo, hi)  # seeded


def test_a_consistent_gain_is_resolved_and_noise_is_not():
    base = [0.1 * (i % 7) for i in range(80)]
    better = [x + 0.05 + 0.01 * (i % 3) for i, x in enumerate(base)]
    est, lo, hi = paired_difference(better, base)
    assert 0.05 < lo <= est <= hi < 0.07
    noisy = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base)]
    est, lo, hi = paired_difference(noisy, base)
    assert abs(est) < 1e-12 and lo < 0 < hi


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_differences_pair_each_model_with_those_before_it_and_render():
    per_prompt = {"fp": {"flips": [0, 0], "rouge_l": [1.0, 1.0]},
                  "rtn": {"flips": [3, 3], "rouge_l": [0.3, 0.3]},
                  "kd": {"flips": [2, 2], "rouge_l": [0.4, 0.4]},
                  "qdpo": {"flips": [1, 1], "rouge_l": [0.5, 0.5]}}
    d = differences(per_prompt, tokens=[10, 10])
    assert [(x["model"], x["against"]) for x in d] == [("kd", "rtn"), ("qdpo", "rtn"), ("qdpo", "kd")]
    assert d[1]["flip_rate"] == pytest.approx((-0.2, -0.2, -0.2))  # (1 + 1 − 3 − 3) / 20 tokens
    assert d[2]["rouge_l"] == pytest.approx((0.1, 0.1, 0.1))
    report = {"prompts": "p", "n_prompts": 2, "max_new_tokens": 4, "perplexity_texts": "t", "differences": d,
              "models": {m: {"flip_rate": 0.1, "rouge_l": 0.5, "exact_match": 0.0, "perplexity": 5.0} for m in per_prompt}}
    assert "| qdpo − rtn | -20.0 [-20.0, -20.0] | +0.200 [+0.200, +0.200] |" in results_table(report)


def _run(path, models, per_prompt=None, fp=("a b c", "d e f")):
    import json

    path.mkdir()
    rows = [{"id": f"p{i}", "prompt": "q", "fp": f, **{m: t[i] for m, t in models.items()}} for i, f in enumerate(fp)]
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if per_prompt:
        (path / "results.json").write_text(json.dumps({"per_prompt": {"ids": ["p0", "p1"], "tokens": [3, 3], **per_prompt}}))
    return path


def test_runs_compared_from_their_files(tmp_path, capsys):
    from qdpo_ray.evaluate.stats import main

    a = _run(tmp_path / "a", {"rtn": ["x y z", "d e f"]})  # an older run: samples only → ROUGE-L, no flips
    b = _run(tmp_path / "b", {"qdpo": ["a b c", "d e f"]},
             per_prompt={"qdpo": {"flips": [0, 0], "rouge_l": [1.0, 1.0]}})
    main([f"{a}:rtn", f"{b}:qdpo"])
    assert "| qdpo − rtn | — | +0.500 [+0.000, +1.000] |" in capsys.readouterr().out
    c = _run(tmp_path / "c", {"kd": ["a", "b"]}, fp=("other", "fp answers"))
    with pytest.raises(SystemExit, match="other fp answers"):
        main([f"{a}:rtn", f"{c}:kd"])
    with pytest.raises(SystemExit, match="no model 'kd'"):
        main([f"{a}:kd"])


def test_a_configurations_seeds_enter_as_their_per_prompt_mean(tmp_path, capsys):
    from qdpo_ray.evaluate.stats import main

    r = _run(tmp_path / "r", {"rtn": ["a", "b"]}, per_prompt={"rtn": {"flips": [2, 2], "rouge_l": [0.0, 0.0]}})
    s0 = _run(tmp_path / "s0", {"q": ["a", "b"]}, per_prompt={"q": {"flips": [0, 2], "rouge_l": [1.0, 0.0]}})
    s1 = _run(tmp_path / "s1", {"q": ["a", "b"]}, per_prompt={"q": {"flips": [2, 0], "rouge_l": [0.0, 0.5]}})
    main([f"{r}:rtn", f"q2={s0}:q,{s1}:q"])  # per prompt: ROUGE-L 0.5 and 0.25, flips 1 and 1 of 3 tokens each
    assert "| q2 − rtn | -33.3 [-33.3, -33.3] | +0.375 [+0.250, +0.500] |" in capsys.readouterr().out
    old = _run(tmp_path / "old", {"q": ["a", "b"]})  # no per-prompt flips: the mean has none either
    main([f"{r}:rtn", f"q2={s0}:q,{old}:q"])
    assert "| q2 − rtn | — |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="two runs or more"):
        main([f"{r}:rtn", f"q2={s0}:q"])
    other = _run(tmp_path / "o", {"q": ["a", "b"]}, fp=("x", "y"))
    with pytest.raises(SystemExit, match="other prompts or fp answers"):
        main([f"{r}:rtn", f"q2={s0}:q,{other}:q"])
