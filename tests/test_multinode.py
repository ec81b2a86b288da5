"""Two Ray nodes on one machine: the closest a laptop gets to `ray up cluster.yaml`.

A head node (`node_a`) and a second node (`node_b`) are started with `ray start --block`, each advertising
one custom `slot` resource, so `{slot: 1}` per worker / per engine forces one per node. Every driver
(`qdpo-ray train`, `qdpo-ray generate-pairs`, a small state monitor) is a subprocess with RAY_ADDRESS set:
this pytest process never calls `ray.init()` for this cluster, and the cluster writes its address file
(`ray_current_cluster`) under its own `--temp-dir`, never /tmp/ray, so a bare `ray.init()` elsewhere in the
test session (the `ray_local` fixture) cannot auto-connect to it. Every port is picked free, the dashboard
is off and token auth is disabled for these nodes only (RAY_AUTH_MODE in their environment).

Clean-up never uses `ray stop` (it kills every Ray process on the machine, other sessions' included): each
node runs in its own process group, and every process of this cluster carries a marker in its environment
(QDPO_MN_NODE, inherited by raylet → workers, which Ray puts in process groups of their own), so the test
kills exactly its own processes, and "killing a node" is SIGKILL to its raylet and all of its workers.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import save_tiny_model_dir, synthetic_pairs

# Part of the suite (CI included): 2 passed in 186 s alone on a 2-core AMD EPYC (docs/results.md).
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MARK = "QDPO_MN_NODE"

# A driver connected to the cluster that records, every 0.5 s, the nodes and the actors (class, state,
# node) in state.json, plus a timeline of every change of the set of placed actors (class, node, id; being
# created or alive) and of the free `slot` resources, so short-lived placements are not missed between two
# reads of the file.
_MONITOR = r"""
import json, os, sys, time
import ray
from ray._private import state

out, stop = sys.argv[1], sys.argv[2]
ray.init(logging_level="ERROR", log_to_driver=False)
timeline, last = [], None
while not os.path.exists(stop):
    try:
        nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
        actors = [{"id": a["ActorID"], "cls": a["ActorClassName"], "state": a["State"],
                   "node": a["Address"]["NodeID"], "pid": a["Pid"]} for a in state.actors().values()]
        slot_free = ray.available_resources().get("slot", 0.0)
    except Exception as e:
        print("monitor:", repr(e), flush=True)
        time.sleep(0.5)
        continue
    placed = [[a["cls"], a["node"], a["id"]] for a in actors
              if a["state"] in ("PENDING_CREATION", "ALIVE") and a["node"].strip("0")]
    now = (sorted(placed), slot_free)
    if now != last:
        timeline.append({"t": time.time(), "placed": now[0], "slot_free": slot_free})
        last = now
    with open(out + ".tmp", "w") as f:
        json.dump({"t": time.time(), "nodes": nodes, "actors": actors, "timeline": timeline}, f)
    os.replace(out + ".tmp", out)
    time.sleep(0.5)
"""

# `qdpo-ray generate-pairs` as a driver process of the cluster.
_PAIRS_DRIVER = r"""
import sys
from qdpo_ray import cli
sys.exit(cli.main(sys.argv[1:]))
"""


_TAKEN: set[int] = set()


def _free_port() -> int:
    """A port no one listens on, below the kernel's ephemeral range (a port picked by binding port 0 can
    be handed out again, to us or to any outgoing connection) and above Ray's worker ports (10002-19999)."""
    try:
        hi = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        hi = 32768
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20000, max(hi, 20500))
        if port in _TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
    raise RuntimeError("no free port")


def _exe(name: str, module: str) -> list[str]:
    return [str(BIN / name)] if (BIN / name).exists() else [sys.executable, "-m", module]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"<no {path}>"


class TwoNodeCluster:
    """`ray start --head` + `ray start --address` on this machine, each node killable as a whole."""

    def __init__(self, root: Path, num_cpus: int = 4):
        self.root = root  # short (unix socket paths under it must stay < 108 bytes)
        self.tag = uuid.uuid4().hex[:12]
        self.num_cpus = num_cpus
        self.port, self.address, self.head_tmp = 0, "", root / "a"  # set when the head starts
        self.procs: dict[str, subprocess.Popen] = {}  # node name → its `ray start --block`
        self.others: list[subprocess.Popen] = []  # drivers and the monitor
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                        RAY_DEDUP_LOGS="0",
                        # no idle workers started ahead of need: 2 cores, 2 nodes, a driver per test
                        RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0")
        self.monitor_out = root / "state.json"
        self.monitor_stop = root / "monitor.stop"

    # -- nodes -----------------------------------------------------------------------------------
    def start_node(self, name: str, resources: dict[str, float], head: bool = False,
                   attempts: int = 3, timeout: float = 240) -> subprocess.Popen:
        """Start a node and wait until `ray start` reports it up; a failed try is killed and retried
        with fresh ports."""
        for attempt in range(attempts):
            tmp = f"{name}{attempt}" if attempt else name
            node_id = os.urandom(28).hex()
            proc = self._spawn(name, resources, head, tmp, node_id)
            deadline = time.time() + timeout
            announced = False
            while proc.poll() is None and time.time() < deadline:
                announced = announced or self._announce_agent_port(self.root / tmp, node_id, proc.agent_port)
                if "Ray runtime started" in _tail(proc.log, 10**6):
                    return proc
                time.sleep(0.1)
            print(f"node {name}: try {attempt + 1} failed (rc {proc.poll()}):\n{_tail(proc.log, 1500)}")
            self.kill_node(name)
        raise AssertionError(f"node {name} did not start in {attempts} tries; last log:\n{_tail(proc.log)}")

    @staticmethod
    def _announce_agent_port(tmp: Path, node_id: str, port: int) -> bool:
        """Write the dashboard agent's port file for the raylet before the agent does.

        Ray 2.60's raylet is not given the agent's listen port: it waits a fixed ~15 s for the agent to
        write it to <session dir>/dashboard_agent_listen_port_<node id>, then aborts. On a loaded 2-core
        machine the agent's imports alone take longer (measured 25 s at load 15), so a node fails to start.
        The port is known (we pass --dashboard-agent-listen-port), so the file is written here as soon as
        the session directory exists; the agent later writes the same number. Without these internals
        (another Ray version) the retries in start_node remain."""
        try:
            from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, get_port_filename
        except ImportError:
            return True
        sessions = [d for d in tmp.glob("session_2*") if d.is_dir() and not d.is_symlink()]
        for d in sessions:
            f = d / get_port_filename(node_id, DASHBOARD_AGENT_LISTEN_PORT_NAME)
            if not f.exists():
                part = d / f".{f.name}.tmp"
                part.write_text(str(port))
                part.replace(f)
        return bool(sessions)

    def _spawn(self, name: str, resources: dict[str, float], head: bool, tmp: str, node_id: str
               ) -> subprocess.Popen:
        agent_port = _free_port()
        cmd = [*_exe("ray", "ray.scripts.scripts"), "start", "--block", "--disable-usage-stats",
               "--num-cpus", str(self.num_cpus), "--resources", json.dumps(resources),
               "--object-store-memory", str(512 * 2**20), "--temp-dir", str(self.root / tmp),
               "--dashboard-agent-listen-port", str(agent_port)]
        for p in ["--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
                  "--runtime-env-agent-port", "--metrics-export-port"]:
            cmd += [p, str(_free_port())]
        if head:
            self.port = _free_port()
            self.address = f"127.0.0.1:{self.port}"
            self.head_tmp = self.root / tmp
            cmd += ["--head", "--port", str(self.port), "--include-dashboard=false",
                    "--ray-client-server-port", str(_free_port())]
        else:
            cmd += ["--address", self.address]
        env = {**self.env, MARK: f"{self.tag}-{name}", "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id}
        log_path = self.root / f"{tmp}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log, proc.agent_port = log_path, agent_port
        self.procs[name] = proc
        return proc

    def _marked_pids(self, name: str | None = None) -> list[int]:
        """Processes of this cluster (or of one node): their environment carries this cluster's marker."""
        want = f"{MARK}={self.tag}-{name}".encode() if name else f"{MARK}={self.tag}-".encode()
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                env = Path(f"/proc/{d}/environ").read_bytes()
            except OSError:
                continue
            if any(v == want or (name is None and v.startswith(want)) for v in env.split(b"\0")):
                pids.append(int(d))
        return pids

    def kill_node(self, name: str) -> None:
        """SIGKILL a node: its process group (ray start, raylet, agents) and its workers."""
        proc = self.procs.get(name)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self._marked_pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    # -- drivers ---------------------------------------------------------------------------------
    def driver(self, args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        env = {**self.env, "RAY_ADDRESS": self.address, MARK: f"{self.tag}-driver", **(env or {})}
        with open(log, "w") as f:
            p = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        p.log = log
        self.others.append(p)
        return p

    def start_monitor(self) -> None:
        self.monitor_stop.unlink(missing_ok=True)
        self.monitor_out.unlink(missing_ok=True)
        self.driver([sys.executable, "-c", _MONITOR, str(self.monitor_out), str(self.monitor_stop)],
                    self.root / "monitor.log")

    def state(self) -> dict:
        try:
            return json.loads(self.monitor_out.read_text())
        except (OSError, ValueError):
            return {}

    def wait_for(self, pred, timeout: float, what: str, procs: tuple = ()):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.state()
            got = pred(s) if s else None
            if got:
                return got
            for p in procs:
                if p.poll() is not None:
                    raise AssertionError(f"{what}: a process exited ({p.args[:3]}, rc {p.returncode})\n"
                                         f"--- {p.log} ---\n{_tail(p.log)}")
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                             f"monitor state: {json.dumps(self.state())[:3000]}\n{_tail(self.root / 'monitor.log')}")

    def alive_slot_nodes(self, s: dict) -> dict[str, str]:
        """node id → node_a / node_b for the alive nodes that advertise a slot."""
        out = {}
        for n in s.get("nodes", []):
            if n["alive"] and n["resources"].get("slot"):
                out[n["id"]] = "node_a" if "node_a" in n["resources"] else "node_b"
        return out

    # -- clean-up --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.monitor_stop.touch()
        for p in self.others:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in list(self.procs):
            self.kill_node(name)
        for _ in range(3):  # workers a raylet started just before it died
            pids = self._marked_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for p in self.others:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="qmn-", dir="/tmp"))
    c = TwoNodeCluster(root)
    default_addr = Path("/tmp/ray/ray_current_cluster")  # what a bare ray.init() would join

    # A SIGTERM to pytest (a CI timeout) skips `finally`: take the cluster down first, then terminate.
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous

    def on_term(signum, frame):
        c.shutdown()
        if not os.environ.get("QDPO_MN_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    try:
        c.start_node("a", {"node_a": 1, "slot": 1}, head=True)
        c.start_monitor()
        c.wait_for(lambda s: "node_a" in c.alive_slot_nodes(s).values(), 120, "the monitor", (c.procs["a"],))
        c.start_node("b", {"node_b": 1, "slot": 1})
        c.wait_for(lambda s: len(c.alive_slot_nodes(s)) == 2, 120, "the second node", (c.procs["a"], c.procs["b"]))
        # the cluster's address file is its own: a bare ray.init() in this session cannot find it
        assert (c.head_tmp / "ray_current_cluster").is_file()
        assert not default_addr.is_file() or f":{c.port}" not in default_addr.read_text()
        yield c
    finally:
        signal.signal(signal.SIGTERM, previous)
        c.shutdown()
        leftover = c._marked_pids()
        if not os.environ.get("QDPO_MN_KEEP"):  # set it to keep the nodes' logs for a post-mortem
            shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"processes of the test cluster survived clean-up: {leftover}"


def _train_workers(s: dict) -> list[dict]:
    return [a for a in s.get("actors", []) if a["cls"] == "RayTrainWorker" and a["state"] == "ALIVE"]


def _committed_checkpoint_state(ray_dir: Path) -> dict | None:
    """train_state.json of the latest checkpoint Ray Train has committed (every rank reported it: listed in
    checkpoint_manager_snapshot.json). A checkpoint directory can exist, with rank 0's train_state.json in
    it, before the other rank has reported: killed then, the run has nothing to restore from."""
    for snapshot in ray_dir.glob("*/checkpoint_manager_snapshot.json") if ray_dir.exists() else []:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
            return json.loads((snapshot.parent / latest["checkpoint_dir_name"] / "train_state.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):  # being written, or nothing committed yet
            continue
    return None


def test_two_node_training_survives_a_node_loss(cluster, tmp_path):
    """2 workers, one per node; node_b dies after the first checkpoint and comes back; the run resumes
    from its checkpoint and finishes with one metrics row per step."""
    model = save_tiny_model_dir(tmp_path / "model")
    pairs = synthetic_pairs(tmp_path / "pairs", n=16)
    out = tmp_path / "train"
    steps = 12
    cmd = [*_exe("qdpo-ray", "qdpo_ray.cli"), "train", f"--out={out}", f"--model={model}", f"--pairs={pairs}",
           "--workers=2", f"--max-steps={steps}", "--train.lr=1e-3", "--train.warmup_steps=0",
           "--train.schedule=constant", "--train.per_device_batch_size=4", "--train.checkpoint_every=2",
           "--train.max_failures=3", '--train.resources_per_worker={"slot": 1}']
    log = tmp_path / "train.log"
    t0 = time.time()
    drv = cluster.driver(cmd, log)

    def fail(msg):
        return f"{msg}\n--- driver log ---\n{_tail(log)}"

    # 1. the two live workers sit on the two nodes
    placed = cluster.wait_for(lambda s: (w := _train_workers(s)) and len({x["node"] for x in w}) == 2 and w,
                              300, "two train workers on two nodes", (drv,))
    nodes = cluster.alive_slot_nodes(cluster.state())
    assert sorted(nodes.get(w["node"]) for w in placed) == ["node_a", "node_b"], (placed, nodes)
    node_a, old_b = (next(w["node"] for w in placed if nodes[w["node"]] == k) for k in ("node_a", "node_b"))
    first_ids = {w["id"] for w in placed}

    # 2. after the first committed checkpoint, kill node_b (raylet + its worker); remember what it holds
    deadline = time.time() + 300
    snap = None
    while time.time() < deadline and drv.poll() is None:
        snap = _committed_checkpoint_state(out / "ray")
        if snap and snap["step"] < steps:
            break
        time.sleep(0.2)
    assert drv.poll() is None, fail(f"the run ended before node_b could be killed (rc {drv.returncode})")
    assert snap and snap["step"] < steps, fail("no checkpoint before the end of training")
    t_kill = time.time()
    cluster.kill_node("b")
    t1 = time.time()
    cluster.start_node("b2", {"node_b": 1, "slot": 1})
    t_restart = time.time()
    cluster.wait_for(lambda s: len(cluster.alive_slot_nodes(s)) == 2 and old_b not in cluster.alive_slot_nodes(s),
                     120, "node_b back (and the old node_b dead)", (drv,))

    # 3. a new worker group (on node_a and the new node_b) resumes and finishes
    try:
        rc = drv.wait(timeout=600)
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.time() - t0
    assert rc == 0, fail(f"train driver exited {rc}")
    s = cluster.state()
    seen = {(cls, node, aid) for e in s["timeline"] for cls, node, aid in e["placed"] if cls == "RayTrainWorker"}
    second = {node for _, node, aid in seen if aid not in first_ids}
    dead = {n["id"] for n in s["nodes"] if not n["alive"]}
    assert old_b in dead, s["nodes"]
    # the restarted worker group ran on node_a and on the new node_b
    assert node_a in second and second - {node_a, old_b}, fail(f"restarted workers: {seen}")
    # the two workers held both slots (one per node)
    pairs_up = [e for e in s["timeline"] if sum(cls == "RayTrainWorker" for cls, _, _ in e["placed"]) == 2]
    assert any(e["slot_free"] == 0 for e in pairs_up), pairs_up
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    with open(out / "metrics.csv") as f:
        hist = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert [int(r["step"]) for r in hist] == list(range(1, steps + 1))
    # Restored, not restarted from scratch: the rows of the steps before the checkpoint are the
    # checkpoint's own, wall-clock throughput included (a recomputed step would time differently).
    k = snap["step"]
    for old, new in zip(snap["history"], hist[:k]):
        assert new["tokens_per_s"] == pytest.approx(old["tokens_per_s"], rel=1e-9), (old, new)
        assert new["loss"] == pytest.approx(old["loss"], rel=1e-9)
    print(f"\ntrain: {wall:.0f} s in all; killed node_b after step {k} at +{t_kill - t0:.0f} s "
          f"(kill {t1 - t_kill:.1f} s, restart issued +{t_restart - t_kill:.1f} s); "
          f"restarted workers on {len(second)} nodes")


def test_two_node_pairs_one_engine_per_node(cluster, tmp_path):
    """generate-pairs with one fp and one quantized vLLM engine, `{slot: 1}` each: one engine per node.

    On CPUs without vLLM's W4 kernel (no AVX-512) the probe of both nodes makes the π_q engine dense
    (generate.engine.w4_engine_dir); placement is the same either way."""
    model = save_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "pairs"
    env = {}
    cmd = [sys.executable, "-c", _PAIRS_DRIVER, "generate-pairs", f"--out={out}", f"--model={model}",
           "--prompts=builtin:eval", "--limit=6", "--answer-tokens=8", "--actors=1",
           '--pairs.engine.resources={"slot": 1}', "--pairs.engine.max_model_len=256",
           "--pairs.engine.batch_size=4", "--pairs.drop_identical=false", "--pairs.fidelity_sample=0"]
    log = tmp_path / "pairs.log"
    t_start = len(cluster.state().get("timeline", []))
    t0 = time.time()
    drv = cluster.driver(cmd, log, env=env)
    try:
        rc = drv.wait(timeout=900)
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.time() - t0
    assert rc == 0, f"generate-pairs exited {rc}\n--- driver log ---\n{_tail(log)}"
    from qdpo_ray.generate.pairs import load_pairs

    rows = load_pairs(out)
    assert len(rows) == 6 and all(r["chosen_token_ids"] and r["rejected_token_ids"] for r in rows)
    s = cluster.state()
    names = {n["id"]: ("node_a" if "node_a" in n["resources"] else "node_b") for n in s["nodes"] if n["alive"]}
    timeline = s["timeline"][t_start:]
    engines = {aid: node for e in timeline for cls, node, aid in e["placed"] if "vLLMEngineStageUDF" in cls}
    both = [e for e in timeline if len({aid for cls, _, aid in e["placed"] if "vLLMEngineStageUDF" in cls}) == 2]
    print(f"\npairs: {wall:.0f} s; {len(rows)} pairs; engines on {sorted(names.get(n) for n in engines.values())}")
    assert len(engines) == 2, engines  # one fp and one π_q engine, never restarted
    assert sorted(names[n] for n in engines.values()) == ["node_a", "node_b"], (engines, names)
    # the two engines were up at the same time, holding both slots
    assert any(e["slot_free"] == 0 for e in both), both
