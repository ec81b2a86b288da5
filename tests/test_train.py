"""QDPO training on real components: a local Ray cluster, Ray Train workers, real DeepSpeed ZeRO-2/3."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import pids_with, synthetic_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs16(module_tmp):
    return synthetic_pairs(module_tmp / "pairs16", n=16)


def _cfg(out, model, pairs, *extra):
    from qdpo_ray.config import load_config

    return load_config(None, [f"out={out}", f"model.name={model}", f"train.pairs={pairs}", "train.lr=1e-3",
                              "train.warmup_steps=0", "train.schedule=constant", "train.num_workers=2",
                              "train.per_device_batch_size=4", *extra])


# Full batch (2 workers × 8 = all 16 pairs each step), a checkpoint every 2 steps: one run that shows ZeRO-2
# learning, is the exact reference of the killed-worker resume, and is round 1 of an on-policy round.
FULL_BATCH = ("train.per_device_batch_size=8", "train.max_steps=12", "train.checkpoint_every=2", "train.max_failures=2")


@pytest.fixture(scope="module")
def full_batch_run(module_tmp, ray_local, tiny_model_dir, pairs16):
    from qdpo_ray.train.trainer import run_train

    out = module_tmp / "full_batch"
    out.mkdir()
    return out, run_train(_cfg(out, tiny_model_dir, pairs16, *FULL_BATCH))


def test_qdpo_zero2_learns(full_batch_run):
    from transformers import AutoModelForCausalLM

    out, s = full_batch_run
    hist = _metrics(out)
    first, last = hist[0], hist[-1]
    # step 0: π_θ ≡ π_q, so the implicit rewards vanish and the loss is log 2
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert last["loss"] < first["loss"] - 0.3
    assert last["rewards/margins"] > 0.5 and last["rewards/accuracies"] == 1.0
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]
    assert s["steps"] == 12 and (out / "training.png").is_file() and list((out / "tensorboard").iterdir())
    w4 = AutoModelForCausalLM.from_pretrained(s["export"], dtype=torch.float32)
    assert w4.config.quantization_config is not None


def test_next_round_starts_from_trained_weights_with_them_as_reference(tmp_path, full_batch_run, tiny_model_dir,
                                                                      pairs16):
    """An on-policy round (train.rounds): π_θ and the reference both start at the previous round's
    result, so step-0 rewards are 0 again — against a reference that is no longer π_q."""
    import pyarrow.parquet as pq

    from qdpo_ray.train.rounds import final_weights
    from qdpo_ray.train.trainer import run_train

    r1_out, r1 = full_batch_run
    r2 = run_train(_cfg(tmp_path / "r2", tiny_model_dir, pairs16, "train.num_workers=1", "train.max_steps=1",
                        "train.export=false"), init_weights=final_weights(r1))
    first = _metrics(tmp_path / "r2")[0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    ref1 = pq.read_table(r1_out / "reference.parquet").column("ref_rejected_logps").to_pylist()
    ref2 = pq.read_table(tmp_path / "r2" / "reference.parquet").column("ref_rejected_logps").to_pylist()
    assert max(abs(a - b) for a, b in zip(ref1, ref2)) > 0.1  # round 1 moved the rejected answers' log-probs
    assert r2["run_name"] != r1["run_name"]


def _metrics(out):
    import csv

    with open(Path(out) / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_qdpo_zero3_step0_and_export(tmp_path, ray_local, tiny_model_dir, pairs16):
    from qdpo_ray.train.trainer import run_train

    s = run_train(_cfg(tmp_path, tiny_model_dir, pairs16, "train.zero_stage=3", "train.max_steps=6",
                       "train.checkpoint_every=3"))
    hist = _metrics(tmp_path)
    assert abs(hist[0]["rewards/chosen"]) < 1e-4 and abs(hist[0]["rewards/margins"]) < 1e-4
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert Path(s["export"], "model.safetensors").is_file()


def test_killed_worker_resumes_to_same_loss(tmp_path, full_batch_run, tiny_model_dir, pairs16):
    from qdpo_ray.train.trainer import run_train

    # Full batch: the result cannot depend on which rows each worker's shard holds after the restart, so a
    # correct resume must reproduce the uninterrupted run exactly.
    # The kill lands after the first checkpoint with most steps still to run: on a fast CPU the tail of
    # a short run can finish between two polls, and a run with nothing left to resume proves nothing.
    # It also writes its checkpoints through a local train.checkpoint_dir and keeps one in storage.
    _, ref = full_batch_run
    out = tmp_path / "killed"
    local = tmp_path / "local-nvme"
    killed, staged = [], set()

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if local.is_dir():
                staged.update(p.name for p in local.iterdir())
            ray_dir = out / "ray"
            if ray_dir.exists() and list(ray_dir.rglob("checkpoint_*/train_state.json")):
                state = json.loads(sorted(ray_dir.rglob("checkpoint_*/train_state.json"))[-1].read_text())
                pids = pids_with(b"RayTrainWorker")
                if 2 <= state["step"] < 12 and pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(state["step"])
            time.sleep(0.05)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    res = run_train(_cfg(out, tiny_model_dir, pairs16, *FULL_BATCH, f"train.checkpoint_dir={local}",
                         "train.keep_checkpoints=1"))
    th.join(timeout=5)
    assert killed, "no worker was killed"
    assert {n.split("-")[1] for n in staged} == {"rank0", "rank1"}, staged  # every rank staged its partition there
    # Ray Train keeps one; the killed attempt may leave one more it never registered (a rank died mid-copy)
    (snapshot,) = (out / "ray").glob("train-*/checkpoint_manager_snapshot.json")
    assert len(json.loads(snapshot.read_text())["checkpoint_results"]) == 1
    assert len([p for p in (out / "ray").glob("train-*/checkpoint_*") if p.is_dir()]) <= 2
    assert res["steps"] == 12
    assert res["final"]["loss"] == pytest.approx(ref["final"]["loss"], abs=1e-3)
    assert res["final"]["rewards/margins"] == pytest.approx(ref["final"]["rewards/margins"], abs=1e-3)


def test_a_finished_run_keeps_its_weights_not_its_resume_state(full_batch_run, tiny_model_dir, pairs16):
    """A finished run drops DeepSpeed's optimizer state from its checkpoints (4.7 of a 4.8 GB training
    directory on the embedded model); the same configuration again trains nothing and returns the same
    result from what it kept."""
    from qdpo_ray.train.trainer import run_train

    out, s = full_batch_run
    ckpts = sorted(p for p in (out / "ray").glob("train-*/checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2 and s["resume_state_freed_gb"] > 0
    assert not [p for c in ckpts for p in c.iterdir() if p.name not in ("train_state.json", "policy.safetensors")]
    assert (Path(s["checkpoint"]) / "policy.safetensors").is_file()
    again = run_train(_cfg(out, tiny_model_dir, pairs16, *FULL_BATCH))
    assert again["checkpoint"] == s["checkpoint"] and again["steps"] == s["steps"] == 12
    assert again["final"] == s["final"] and again["codes_moved"] == s["codes_moved"]
    assert len(_metrics(out)) == 12


def test_lora_trains_adapters_only(tmp_path, ray_local, tiny_model_dir, pairs16):
    from qdpo_ray.train.trainer import run_train

    s = run_train(_cfg(tmp_path, tiny_model_dir, pairs16, "train.lora.enabled=true", "train.lora.r=8",
                       "train.lora.alpha=8", "train.num_workers=1", "train.max_steps=8", "train.lr=3e-3"))
    hist = _metrics(tmp_path)
    assert abs(hist[0]["rewards/chosen"]) < 1e-4
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert s["trainable_params"] < 0.1 * s["total_params"]
    assert Path(s["adapter"], "adapter_config.json").is_file() and Path(s["export"], "config.json").is_file()


def test_flip_level_qdpo_with_kd_trains_and_a_round_takes_the_new_reference(tmp_path, ray_local, tiny_model_dir, pairs16):
    """`qdpo_flips+kd` on Ray Train + DeepSpeed (2 workers): step 0 is log 2 + KD with zero rewards, the
    flips' margins grow, and a second round (its reference the first round's π_θ, built in the workers)
    starts at zero rewards again, on a different set of flips."""
    from qdpo_ray.train.rounds import final_weights
    from qdpo_ray.train.trainer import run_train

    extra = ("train.objective=qdpo_flips+kd", "train.beta=0.5", "train.max_steps=6", "train.checkpoint_every=6")
    r1 = run_train(_cfg(tmp_path / "r1", tiny_model_dir, pairs16, *extra))
    h1 = _metrics(tmp_path / "r1")
    assert abs(h1[0]["rewards/chosen"]) < 1e-6 and abs(h1[0]["rewards/rejected"]) < 1e-6
    assert h1[0]["loss"] > 0.6931  # log 2 plus a positive KL
    assert h1[-1]["rewards/margins"] > 0.1 and h1[-1]["rewards/accuracies"] > 0.5
    assert Path(r1["export"]).name == "w4-qdpo_flips-kd"
    run_train(_cfg(tmp_path / "r2", tiny_model_dir, pairs16, *extra[:2], "train.max_steps=1", "train.export=false"),
              init_weights=final_weights(r1))
    h2 = _metrics(tmp_path / "r2")[0]
    assert abs(h2["rewards/chosen"]) < 1e-6 and abs(h2["rewards/rejected"]) < 1e-6
    # π_θ's log-prob of the reference's argmax at the flips: round 1's π_θ has its own argmaxes
    assert abs(h2["logps/rejected"] - h1[0]["logps/rejected"]) > 1e-3
