"""AWQ / GPTQ baselines: llm-compressor in its own environment (scripts/setup_llmcompressor_venv.sh), run on
a tiny Llama with the embedded model's tokenizer; the result must be a 4-bit checkpoint on the RTN grid
that this environment loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qdpo_ray.config import ConfigError, load_config
from qdpo_ray.quant import ptq, ptq_worker


def test_worker_scheme_is_the_rtn_grid():
    ch = ptq_worker._scheme(4, 0, False, ["Linear"])["group_0"]["weights"]
    assert (ch["num_bits"], ch["symmetric"], ch["strategy"], ch["observer"]) == (4, False, "channel", "minmax")
    assert "group_size" not in ch
    g = ptq_worker._scheme(4, 64, True, ["Linear"])["group_0"]["weights"]
    assert (g["strategy"], g["group_size"], g["symmetric"]) == ("group", 64, True)


def test_missing_environment_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("QDPO_LLMCOMPRESSOR_PYTHON", raising=False)
    with pytest.raises(ConfigError, match=r"ptq\.python=.*setup_llmcompressor_venv\.sh"):
        ptq.ptq_python(str(tmp_path / "nope" / "python"))
    cfg = load_config(None, [f"out={tmp_path}", f"ptq.python={tmp_path / 'nope'}", "ptq.method=gptq"])
    with pytest.raises(ConfigError, match="ptq.python"):
        ptq.run_ptq(cfg)
    with pytest.raises(ConfigError, match="ptq.method"):
        load_config(None, ["ptq.method=smoothquant"])


def _env_python() -> str:
    try:
        return ptq.ptq_python(None)
    except ConfigError as e:
        if os.environ.get("QDPO_REQUIRE_LLMCOMPRESSOR"):  # CI made the environment: its absence is a failure
            pytest.fail(str(e))
        pytest.skip("no llm-compressor environment (bash scripts/setup_llmcompressor_venv.sh; CI makes one)")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_llmcompressor_baseline_on_the_rtn_grid(method, tiny_model_dir, tmp_path):
    from qdpo_ray.models import load_model

    _env_python()
    cfg = load_config(None, [f"out={tmp_path}", f"model.name={tiny_model_dir}", f"ptq.method={method}",
                             "ptq.calibration_samples=8", "ptq.max_seq_len=64"])
    out = ptq.run_ptq(cfg)
    assert out == tmp_path / f"w4-{method}"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    w = next(iter(qc["config_groups"].values()))["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"]) == (4, False, "channel") and "lm_head" in qc["ignore"]
    model = load_model(str(out), dtype="float32")  # this environment's transformers + compressed-tensors
    proj = model.model.layers[0].mlp.down_proj.weight
    assert max(len(torch.unique(row)) for row in proj) <= 16  # every output channel on a 16-level grid
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()
    ref = load_model(tiny_model_dir, dtype="float32").model.layers[0].mlp.down_proj.weight
    assert not torch.equal(proj, ref)
    # AWQ keeps its scaled weights before rounding, the master weights AWQ+QDPO starts from; start_weights
    # raises unless each rounds to the checkpoint's integers on its grid. GPTQ's weights are on its grid.
    from qdpo_ray.quant.fake_quant import LATENT_FILE
    from qdpo_ray.train.trainer import start_weights

    assert (out / LATENT_FILE).is_file() == (method == "awq")
    if method == "awq":
        latent, deq = start_weights(str(out), cfg.quant), start_weights(str(out))
        key = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(deq[key], proj) and not torch.equal(latent[key], proj)
    # The same settings again: found, not recomputed.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ptq.run_ptq(cfg) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert Path(tmp_path / f"ptq-{method}.log").is_file()
