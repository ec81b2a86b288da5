"""Token-flip analysis: the statistics (pure) and a real run on the shipped model."""

import json

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
