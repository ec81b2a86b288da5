"""Checkpoint I/O: the bytes a DeepSpeed checkpoint takes (checked against what real DeepSpeed writes), the
run identity that ignores where checkpoints go, and the checkpoint_dir check. The training run through a
local checkpoint_dir with one checkpoint kept is tests/test_train.py's killed-worker resume."""

import json
import subprocess
import sys

import pytest

from qdpo_ray.train.memory import checkpoint_bytes, checkpoint_bytes_per_param


def test_checkpoint_bytes_per_param_table():
    assert checkpoint_bytes_per_param(2) == 16 and checkpoint_bytes_per_param(3) == 12
    assert checkpoint_bytes_per_param(3, "bf16") == 12  # fp32 masters under bf16 autocast
    assert checkpoint_bytes_per_param(2, lora=True) == checkpoint_bytes_per_param(3, lora=True) == 4
    assert checkpoint_bytes(3, 6_740_000_000) / 1e9 == pytest.approx(80.88)  # Vicuna-7B, full training
    with pytest.raises(ValueError, match="zero_stage"):
        checkpoint_bytes_per_param(1)
    with pytest.raises(ValueError, match="trainable"):
        checkpoint_bytes(3, 10, 11)


_MEASURE = r"""
import json, os, sys, tempfile
from pathlib import Path
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
import deepspeed, torch
deepspeed.init_distributed(dist_backend="gloo")
out = []
for stage in (2, 3):
    for frozen in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
        m[0].requires_grad_(not frozen)  # frozen: a LoRA-like frozen half
        params = [p for p in m.parameters() if p.requires_grad]
        counts = [sum(p.numel() for p in m.parameters()), sum(p.numel() for p in params)]  # before ZeRO-3 partitions
        e, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(params, lr=1e-3), dist_init_required=False,
                                     config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                                             "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
        e.backward(e(torch.randn(1, 512)).sum())
        e.step()
        with tempfile.TemporaryDirectory() as d:
            e.save_checkpoint(d, tag="t")
            size = sum(f.stat().st_size for f in Path(d, "t").iterdir())
        out.append([stage, *counts, size])
print("RESULT " + json.dumps(out))
"""


def test_checkpoint_bytes_match_a_real_deepspeed_checkpoint(tmp_path):
    """ZeRO-2 and ZeRO-3, all trained and half frozen: the formula is what DeepSpeed writes, to within its
    few kB of file headers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    proc = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    for stage, params, trainable, size in json.loads(lines[-1][len("RESULT "):]):
        assert size == pytest.approx(checkpoint_bytes(stage, params, trainable), rel=0.01, abs=20_000), (stage, trainable)


def test_where_checkpoints_go_is_not_part_of_the_run(tmp_path):
    from qdpo_ray.config import ConfigError, load_config
    from qdpo_ray.train.trainer import check, run_name

    base = load_config(None, [f"out={tmp_path}"])
    moved = load_config(None, [f"out={tmp_path}", "train.checkpoint_dir=/mnt/nvme/ckpt", "train.keep_checkpoints=5"])
    other = load_config(None, [f"out={tmp_path}", "train.lr=1e-5"])
    assert run_name(base, "d") == run_name(moved, "d") != run_name(other, "d")  # a moved run resumes
    with pytest.raises(ConfigError, match="train.checkpoint_dir='nvme'.*absolute"):
        check(load_config(None, [f"out={tmp_path}", "train.checkpoint_dir=nvme"]))
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load_config(None, [f"out={tmp_path}", "train.keep_checkpoints=0"])
