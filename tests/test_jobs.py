"""`ray job submit` against a real Ray head started with `ray start --head` on 127.0.0.1.

The head runs with its own --temp-dir and its own ports in its own process group, and is torn down by
signalling that group: `ray stop` would stop every Ray instance of the user on this machine (other tests,
a training run in the background).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# Big or machine-local paths that a job never needs (Ray also honours .gitignore; this is explicit).
EXCLUDES = [".venv", "runs", ".git", ".pytest_cache", "test-artifacts", "**/__pycache__", "*.egg-info"]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_pids(temp_dir: str) -> list[int]:
    """PIDs of processes whose command line names our private temp dir (only ours can)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if temp_dir.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def _start_head(temp_dir: str, env: dict[str, str]) -> tuple[subprocess.Popen, str, object]:
    """`ray start --head` on free ports; returns once its dashboard answers (or raises with its log)."""
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = _free_ports(7)
    log = open(Path(temp_dir) / "ray-start.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={rt_env}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:
        if head.poll() is not None:
            _stop_head(head, temp_dir)  # what the failed start left running in its process group / session
            log.close()
            raise RuntimeError(f"ray start exited {head.returncode}: {(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                return head, address, log
        except urllib.error.HTTPError:
            return head, address, log  # 401 without the token: the dashboard is up
        except OSError:
            pass
        if time.time() > deadline:
            _stop_head(head, temp_dir)
            log.close()
            raise TimeoutError(f"Ray dashboard at {address} did not come up in 180 s")
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="qdpo-rj-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    # Token auth with a private token, given to the head and to the CLI calls alone: the same test passes
    # whether or not the user has a ~/.ray/auth_token, and nothing leaks into this pytest process.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Ray gives its dashboard a fixed time to start; on a loaded 2-core machine it can miss it once
    # (CI run of 2026-12-01: "ray start exited 1", empty dashboard.log). A second start is the user's fix too.
    try:
        head, address, log = _start_head(temp_dir, env)
    except (RuntimeError, TimeoutError):
        head, address, log = _start_head(temp_dir, env)
    try:
        yield {"address": address, "env": env, "temp_dir": temp_dir}
    finally:
        _stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    # The cluster's state is thrown away, so no 30 s drain: SIGTERM, a short grace, then SIGKILL to the
    # group `ray start` leads; the temp-dir sweep catches processes in a session of their own (job drivers).
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    for pid in _session_pids(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ray(args: list[str], head, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], cwd=REPO, env=head["env"], capture_output=True,
                          text=True, **kw)


def test_ray_job_submit_flips_stage(ray_head, tmp_path, embedded_model_dir):
    out = tmp_path / "flips"  # absolute: the job runs in an uploaded copy of the repo
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    sub_id = f"qdpo-test-{os.getpid()}-{int(time.time())}"
    addr = ["--address", ray_head["address"]]
    proc = _ray(["job", "submit", *addr, "--submission-id", sub_id, "--working-dir", str(REPO),
                 "--runtime-env-json", json.dumps(runtime_env), "--",
                 "python", "jobs/flips.py", "--config", "configs/flips.yaml", "--limit", "2",
                 "--max-new-tokens", "8", "--out", str(out)], ray_head, timeout=600)
    st = _ray(["job", "status", *addr, "--log-style=record", "--log-color=false", sub_id], ray_head, timeout=120)
    status = st.stdout + st.stderr
    logs = _ray(["job", "logs", *addr, sub_id], ray_head, timeout=120).stdout
    assert "succeeded" in status.lower(), f"{status}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs[-3000:]}"
    assert proc.returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 2 and summary["max_new_tokens"] == 8 and summary["n_tokens"] > 0
    assert 0.0 <= summary["flip_rate"] <= 1.0 and (out / "margins.png").is_file()
    assert '"flip_rate"' in logs  # the stage's own output came back through the job logs


def test_every_stage_has_a_job_entry():
    from qdpo_ray.cli import _COMMANDS

    for command in _COMMANDS:
        if command == "serve":  # a long-running app: `serve run` / RayService, not a job
            continue
        script = REPO / "jobs" / f"{command.replace('-', '_')}.py"
        assert script.is_file(), f"no job entry for `qdpo-ray {command}`: add {script.relative_to(REPO)}"
        assert f'main(["{command}"' in script.read_text()
