"""Token-flip analysis: the statistics (pure) and a real run on the shipped model."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qdpo_ray.evaluate.flips import summarize


def test_summarize_counts_and_first_flips():
    rows = [
        {"id": "a", "position": 0, "margin": 0.9, "flip": False},
        {"id": "a", "position": 1, "margin": 0.05, "flip": True},
        {"id": "a", "position": 2, "margin": 0.01, "flip": True},
        {"id": "b", "position": 0, "margin": 0.5, "flip": False},
    ]
    s = summarize(rows, ["a", "b"])
    assert (s["n_prompts"], s["n_tokens"], s["n_flips"], s["flip_rate"]) == (2, 4, 2, 0.5)
    assert s["first_flip_positions"] == [1, None]
    assert s["mean_margin_flipped"] == pytest.approx(0.03)
    assert s["mean_margin_unflipped"] == pytest.approx(0.7)


@pytest.mark.slow
def test_flips_on_embedded_model(tmp_path, embedded_model_dir):
    from qdpo_ray.cli import main

    common = ["--model", "smollm2-135m", "--prompts", "builtin:eval", "--limit", "6", "--max-new-tokens", "24"]
    assert main(["flips", *common, "--bits", "4", "--out", str(tmp_path / "w4")]) == 0
    assert main(["flips", *common, "--bits", "16", "--out", str(tmp_path / "fp")]) == 0
    w4 = json.loads((tmp_path / "w4" / "summary.json").read_text())
    fp = json.loads((tmp_path / "fp" / "summary.json").read_text())
    assert 0 < w4["flip_rate"] < 1
    assert fp["n_flips"] == 0 and fp["flip_rate"] == 0.0
    assert w4["n_tokens"] == fp["n_tokens"] and w4["n_prompts"] == 6
    # flipped tokens sit on smaller fp margins (the paper's Fig. 3 observation)
    assert w4["mean_margin_flipped"] < w4["mean_margin_unflipped"]
    tokens = pq.read_table(tmp_path / "w4" / "tokens.parquet").to_pandas()
    assert len(tokens) == w4["n_tokens"] and int(tokens["flip"].sum()) == w4["n_flips"]
    assert (tokens["flip"] == (tokens["q_top1_id"] != tokens["token_id"])).all()
    assert (tmp_path / "w4" / "margins.png").read_bytes()[:4] == b"\x89PNG"


def test_fp_answers_are_generated_once_per_weights_prompts_and_settings(tmp_path, monkeypatch, tiny_model_dir):
    """The fp answers every flips/evaluate run starts from come from disk the second time, and only when the
    weights files, prompts and settings are the same."""
    import os

    from qdpo_ray.config import ModelConfig
    from qdpo_ray.generate import fp_answers
    from qdpo_ray.models import load_model, load_tokenizer

    monkeypatch.setenv("QDPO_RAY_CACHE", str(tmp_path / "cache"))
    cfg = ModelConfig(name=str(tiny_model_dir))
    model, tok = load_model(cfg, dtype="float32"), load_tokenizer(cfg)
    prompts = [[5, 6, 7], [8, 9]]
    calls = []
    real = fp_answers.greedy_generate
    monkeypatch.setattr(fp_answers, "greedy_generate", lambda *a, **k: calls.append(a[3]) or real(*a, **k))

    first = fp_answers.fp_greedy_answers(model, tok, prompts, 5, 2, cfg)
    assert first == real(model, tok, prompts, 5, 2) and calls == [5]
    assert fp_answers.fp_greedy_answers(model, tok, prompts, 5, 2, cfg) == first and calls == [5]
    fp_answers.fp_greedy_answers(model, tok, prompts, 4, 2, cfg)            # another length
    fp_answers.fp_greedy_answers(model, tok, prompts[:1], 5, 2, cfg)        # other prompts
    assert calls == [5, 4, 5]
    weights = next(Path(tiny_model_dir).glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))    # the weights were rewritten
    fp_answers.fp_greedy_answers(model, tok, prompts, 5, 2, cfg)
    assert calls == [5, 4, 5, 5]
    # a hub id without a pinned revision is never cached
    assert fp_answers.weights_id(ModelConfig(name="org/model"), "float32") is None
    assert fp_answers.weights_id(ModelConfig(name="org/model", revision="abc123"), "float32") is not None
