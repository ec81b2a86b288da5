"""Breakdown analysis (paper §3.2, Fig. 2): the maths (pure), the cache bookkeeping on a tiny random Llama,
and one end-to-end CLI run."""

import copy
import json

import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_tiny_llama, save_tiny_model_dir
from qdpo_ray.config import QuantConfig
from qdpo_ray.evaluate.breakdown import (ALONE, CASES, analyse_prompt, case_cache, find_divergence,
                                         first_divergence, run_case, summarize)
from qdpo_ray.generate.hf import greedy_generate
from qdpo_ray.quant.fake_quant import quantize_model_rtn

EOS = 2
N = 8


class _Tok:
    """Enough of a tokenizer for greedy_generate and the scores: every id is one word."""

    pad_token_id = 0
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i == EOS))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Hundreds of one-token forwards of a tiny model: a second thread only adds synchronisation, which on
    # a busy 2-core machine makes each step several times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair():
    fp = make_tiny_llama(vocab=512)
    fp.generation_config.eos_token_id = EOS
    q = quantize_model_rtn(copy.deepcopy(fp), QuantConfig(bits=4))
    return {"fp": fp, "q": q}


def _prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (10,), generator=g).tolist() for _ in range(n)]


def _generate(model, prompt, length):
    return greedy_generate(model, _Tok, [prompt], length, batch_size=1)[0]


@pytest.fixture(scope="module")
def runs(pair):
    """Per prompt: the lock-step divergence and each model's own `generate` answer of 2N tokens (a greedy
    answer of fewer tokens is a prefix of it)."""
    return [(p, find_divergence(pair, p, N, {EOS}), _generate(pair["fp"], p, 2 * N), _generate(pair["q"], p, 2 * N))
            for p in _prompts()]


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([5], [6, 7]) == 0
    assert first_divergence([1, 2], [1, 2, 3]) is None
    assert first_divergence([1, 2], [1, 2]) is None


def test_cases_cover_the_cube_in_the_papers_order():
    assert [c.number for c in CASES] == list(range(1, 9))
    assert len({(c.token, c.kv, c.model) for c in CASES}) == 8
    assert CASES[0].factors == ["token", "kv", "model"] and CASES[7].factors == []
    assert all(c.token == "q" for c in CASES[:4]) and all(c.token == "fp" for c in CASES[4:])
    for f, k in ALONE.items():
        assert CASES[k - 1].factors == [f]


def test_summarize_main_effects_and_conclusion():
    # token costs 0.6, kv 0.1, model 0.2 (additive); one prompt did not diverge and is left out
    def score(c):
        return 1.0 - 0.6 * (c.token == "q") - 0.1 * (c.kv == "q") - 0.2 * (c.model == "q")

    div = {"d": 3, "cases": {str(c.number): {m: score(c) for m in ("rouge1", "rouge2", "rougeL")} for c in CASES}}
    s = summarize([div, copy.deepcopy(div), {"d": None}])
    assert (s["n_prompts"], s["n_diverged"], s["n_identical"]) == (3, 2, 1)
    assert s["cases"]["8"]["rougeL"] == pytest.approx(1.0) and s["cases"]["1"]["rougeL"] == pytest.approx(0.1)
    assert {f: round(s["effects"][f]["rougeL"], 6) for f in ("token", "kv", "model")} == \
        {"token": 0.6, "kv": 0.1, "model": 0.2}
    assert s["alone"]["model"]["rougeL"] == pytest.approx(0.2)
    assert s["effects_se"]["kv"]["rougeL"] == pytest.approx(0.0)  # two identical samples
    assert s["dominant"] == "token" and s["paper_finding_holds"]
    assert "flipped token" in s["conclusion"] and "holds" in s["conclusion"]
    assert summarize([{"d": None}])["dominant"] is None


def test_lockstep_divergence_is_the_first_different_token(runs):
    seen_later = False
    for p, div, a, b in runs:
        d = first_divergence(a, b)
        if d is not None and d >= N:
            d = None  # outside the window
        assert div.d == d
        if d is not None:
            assert div.prefix == a[:d] == b[:d]
            assert (div.token["fp"], div.token["q"]) == (a[d], b[d]) and a[d] != b[d]
            seen_later |= d > 0
    assert seen_later, "no prompt with a common prefix: the test does not exercise the caches"


def test_all_fp_and_all_q_reproduce_each_models_own_answer(pair, runs):
    n_div = 0
    for p, div, a, b in runs:
        if div.d is None:
            continue
        n_div += 1
        own_fp, own_q = a[div.d:div.d + N], b[div.d:div.d + N]
        assert run_case(pair, div, CASES[7], N, {EOS}) == own_fp
        assert run_case(pair, div, CASES[0], N, {EOS}) == own_q
        # the same through the scoring path: case 8 scores 1.0 against fp's own (generate) answer
        rec = analyse_prompt(pair, _Tok(), p, N, {EOS}, fp_full_fn=lambda length, a=a: a[:length],
                             q_full_fn=lambda length, b=b: b[:length])
        assert rec["d"] == div.d and all(rec["checks"].values()), rec["checks"]
        assert rec["cases"]["8"]["rougeL"] == rec["cases"]["8"]["rouge1"] == 1.0
        assert rec["cases"]["1"]["token_ids"] == own_q and rec["reference_token_ids"] == own_fp
    assert n_div >= 3


def _direct_kv(model, ids):
    cache = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def test_each_case_starts_from_the_named_models_kv_cache(pair, runs):
    p, div = next((p, div) for p, div, _, _ in runs if (div.d or 0) >= 2)
    ctx = p + div.prefix
    direct = {k: _direct_kv(m, ctx) for k, m in pair.items()}
    for c in CASES:
        cache = case_cache(div, c)
        assert cache.get_seq_length() == len(ctx)
        other = "fp" if c.kv == "q" else "q"
        for layer, (k, v), (k_o, _) in zip(cache.layers, direct[c.kv], direct[other]):
            torch.testing.assert_close(layer.keys, k, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.values, v, atol=1e-5, rtol=1e-4)
            assert (layer.keys - k_o).abs().max() > 1e-3  # and not the other model's
    # a mixed case by hand: fp token, π_q's cache (from a direct forward), fp continues (case 6)
    cache = pair["q"](input_ids=torch.tensor([ctx]), use_cache=True).past_key_values
    toks = [div.token["fp"]]
    while len(toks) < N and toks[-1] != EOS:
        logits = pair["fp"](input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True).logits
        toks.append(int(logits[0, -1].argmax()))
    assert run_case(pair, div, CASES[5], N, {EOS}) == toks
    # the cases ran on copies: the snapshots still hold exactly the prompt and the prefix
    assert all(c.get_seq_length() == len(ctx) for c in div.cache.values())


def test_cli_writes_every_output(tmp_path):
    from qdpo_ray.cli import main

    fp_dir = save_tiny_model_dir(tmp_path / "fp", seed=0)
    other = save_tiny_model_dir(tmp_path / "other-ckpt", seed=1)  # any model with the same architecture
    out = tmp_path / "bd"
    assert main(["breakdown", "--model", fp_dir, "--bits", "4", "--prompts", "builtin:eval", "--limit", "2",
                 "--max-new-tokens", "4", "--checkpoint", other, "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["models"]) == {"rtn", "other-ckpt"} and report["max_new_tokens"] == 4
    for name in ("README.md", "config.yaml"):
        assert (out / name).is_file()
    readme = (out / "README.md").read_text()
    for label, s in report["models"].items():
        d = out / label
        samples = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 and s["n_prompts"] == 2
        scores = pq.read_table(d / "scores.parquet").to_pandas()
        assert len(scores) == 8 * s["n_diverged"]
        assert json.loads((d / "results.json").read_text())["label"] == label
        if s["n_diverged"]:
            assert (d / "breakdown.png").read_bytes()[:4] == b"\x89PNG"
            assert (d / "sorted.png").read_bytes()[:4] == b"\x89PNG"
            assert s["cases"]["8"]["rougeL"] == 1.0
            assert all(v["passed"] == v["of"] for v in s["checks"].values()), s["checks"]
            assert f"**{label}**" in readme and "Conclusion" in readme
    assert report["models"]["other-ckpt"]["n_diverged"] == 2  # an unrelated random model differs at once
