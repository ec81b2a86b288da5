"""The pipeline console: one line per stage/step on the terminal, everything else in the log file."""

import subprocess
import sys
import textwrap

import pytest


def test_child_processes_log_to_the_file_and_echo_reaches_the_terminal(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path
        from qdpo_ray.console import quiet_console
        with quiet_console(Path({str(tmp_path)!r}) / "logs" / "run.log") as echo:
            print("python noise")
            subprocess.run([sys.executable, "-c", "import sys; print('engine start-up noise'); print('warn', file=sys.stderr)"])
            echo("[pipeline] train: step 1/3")
        print("after")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "[pipeline] train: step 1/3" in p.stdout and "after" in p.stdout
    assert "noise" not in p.stdout + p.stderr and "warn" not in p.stderr
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "python noise" in log and "engine start-up noise" in log and "warn" in log


def test_progress_lines_are_echoed_once_each(tmp_path):
    import time

    from qdpo_ray.console import watch_progress, write_progress

    lines = []
    with watch_progress(tmp_path, lines.append, "[train] ", every_s=0.05):
        for i in range(3):
            write_progress(tmp_path, f"step {i}")
            time.sleep(0.3)
    assert lines == ["[train] step 0", "[train] step 1", "[train] step 2"]


@pytest.mark.slow
def test_kd_baseline_as_a_user_runs_it(tmp_path, tiny_model_dir):
    """`qdpo-ray train --objective kd` as a user runs it: step lines and the summary on the terminal; Ray's
    reports, DeepSpeed and the workers' start-up in <out>/logs/train.log. Full batch, so every step sees the
    same answers: the KL to the fp teacher must fall, and the W4 export is named after the objective. Two
    rounds (`train.rounds`; KD reads no y_l, so nothing is regenerated): round 2 goes on from round 1's
    weights — its first KL is round 1's last, not RTN's — into <out>/round-2, its steps on the terminal too."""
    import csv
    import json
    from pathlib import Path

    from conftest import synthetic_pairs

    pytest.importorskip("deepspeed")
    pairs = synthetic_pairs(tmp_path / "pairs", n=16)
    out = tmp_path / "train"
    cmd = [sys.executable, "-m", "qdpo_ray.cli", "train", f"--out={out}", f"--model={tiny_model_dir}",
           f"--pairs={pairs}", "--objective=kd", "--max-steps=8", "--train.per_device_batch_size=16",
           "--train.lr=1e-4", "--train.warmup_steps=0", "--train.schedule=constant", "--train.checkpoint_every=8",
           "--train.rounds=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "[train] step 8/8" in p.stdout and '"steps": 8' in p.stdout
    assert "RayTrainWorker" not in p.stdout + p.stderr and "TrainingReport" not in p.stdout + p.stderr
    assert "RayTrainWorker" in (out / "logs" / "train.log").read_text()
    assert "[train] round-2: step 8/8" in p.stdout
    loss, loss2 = ([float(r["loss"]) for r in csv.DictReader((d / "metrics.csv").read_text().splitlines())]
                   for d in (out, out / "round-2"))
    assert loss[0] > 0 and loss[-1] < 0.7 * loss[0]
    assert loss2[0] < 0.7 * loss[0] and loss2[-1] < loss2[0]
    s = json.loads((out / "summary.json").read_text())
    assert [Path(r["export"]).relative_to(out).as_posix() for r in s["rounds"]] == ["w4-kd", "round-2/w4-kd"]
