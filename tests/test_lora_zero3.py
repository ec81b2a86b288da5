"""LoRA under ZeRO-3 with the project's non-reentrant selective activation checkpointing: the frozen base
inside a ZeRO-3 engine is what broke DeepSpeed releases before 0.19.3. Two real Ray Train workers on a tiny
random Llama; the run must train (adapters move, loss falls). The version guard is a pure function."""

from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model_dir, synthetic_pairs


def test_version_guard():
    from importlib.metadata import version

    from qdpo_ray.config import ConfigError
    from qdpo_ray.train.checkpointing import check_frozen_recompute, deepspeed_recomputes_frozen_params

    assert not deepspeed_recomputes_frozen_params("0.19.2") and deepspeed_recomputes_frozen_params("0.19.3")
    assert deepspeed_recomputes_frozen_params("0.20.0rc1") and deepspeed_recomputes_frozen_params(version("deepspeed"))
    with pytest.raises(ConfigError, match=r"train.lora.enabled=true with train.zero_stage=3.*0.19.2.*zero_stage=2"):
        check_frozen_recompute(True, 3, "0.19.2")
    check_frozen_recompute(True, 2, "0.19.2")  # ZeRO-2 and full training never hit it
    check_frozen_recompute(False, 3, "0.19.2")


@pytest.mark.slow
def test_lora_zero3_two_workers_trains(tmp_path, ray_local):
    from safetensors.torch import load_file

    from qdpo_ray.config import load_config
    from qdpo_ray.train.trainer import run_train

    model = save_tiny_model_dir(tmp_path / "model", seed=3)
    pairs = synthetic_pairs(tmp_path / "pairs", n=8)
    cfg = load_config(None, [f"out={tmp_path / 'run'}", f"model.name={model}", f"train.pairs={pairs}",
                             "train.zero_stage=3", "train.num_workers=2", "train.lora.enabled=true",
                             "train.lora.r=8", "train.lora.alpha=8", "train.lr=3e-3", "train.warmup_steps=0",
                             "train.schedule=constant", "train.per_device_batch_size=4", "train.max_steps=4",
                             "train.checkpoint_every=4", "train.export=false"])
    s = run_train(cfg)
    import csv

    with open(tmp_path / "run" / "metrics.csv") as f:
        hist = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert len(hist) == 4 and abs(hist[0]["rewards/chosen"]) < 1e-4  # step 0: π_θ ≡ π_q
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.05
    assert all(h["grad_norm"] > 0 for h in hist)
    assert s["trainable_params"] < 0.1 * s["total_params"]
    weights = load_file(str(Path(s["checkpoint"]) / "policy.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(v).all() for v in lora_b)
    assert max(float(v.abs().max()) for v in lora_b) > 1e-4  # B starts at 0: the adapters moved
