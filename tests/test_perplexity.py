"""Perplexity corpora of `qdpo-ray evaluate`: MT-Bench answers (offline default) or a streamed corpus
(WikiText-2 through `datasets` on clusters; a local file here, the hub being unreachable)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qdpo_ray.config import ConfigError, load_config
from qdpo_ray.evaluate.compare import perplexity, perplexity_windows


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from qdpo_ray.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_mtbench_is_one_window_per_answer(tok):
    windows, label = perplexity_windows(tok, "mtbench")
    assert len(windows) == 60 and label.startswith("MT-Bench") and max(map(len, windows)) <= 512
    assert len(perplexity_windows(tok, "mtbench", limit=5)[0]) == 5


def test_a_corpus_is_streamed_in_windows(tok, tmp_path):
    paras = [f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * 40 for i in range(6)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras + ["  "]))
    windows, label = perplexity_windows(tok, str(tmp_path / "c.jsonl"), max_len=128)
    assert sum(windows, []) == tok("\n\n".join(paras)).input_ids  # the whole stream, nothing dropped
    assert all(len(w) == 128 for w in windows[:-1]) and "windows of ≤ 128 tokens" in label
    assert len(perplexity_windows(tok, str(tmp_path / "c.jsonl"), limit=2, max_len=128)[0]) == 2
    (tmp_path / "c.txt").write_text("\n\n".join(paras))
    assert perplexity_windows(tok, str(tmp_path / "c.txt"), max_len=128)[0] == windows


def test_perplexity_is_exp_mean_nll(tiny_model_dir):
    from qdpo_ray.models import load_model

    model = load_model(tiny_model_dir, dtype="float32")
    windows = [[5, 9, 11, 300, 7], [42, 43], [8]]  # a one-token window has nothing to predict
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows[:2]:
            logp = model(torch.tensor([w])).logits[0, :-1].log_softmax(-1)
            nll -= float(logp.gather(1, torch.tensor(w[1:]).unsqueeze(1)).sum())
            n += len(w) - 1
    assert perplexity(model, windows) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_bad_corpus_names_the_field(tok):
    with pytest.raises(ConfigError, match=r"evaluate\.perplexity_corpus='/no/such\.txt'"):
        perplexity_windows(tok, "/no/such.txt")
    assert load_config(None, ["evaluate.perplexity_corpus=hf:wikitext:wikitext-2-raw-v1"]).evaluate.perplexity_corpus \
        == "hf:wikitext:wikitext-2-raw-v1"
