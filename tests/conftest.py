import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A Ray Data pipeline with no progress for 10 minutes is hung (e.g. an engine restarted in a loop): fail
# the test then, not after Ray's default 30 minutes.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "600")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a test skipped for a missing import fails: a broken install must not pass silently. A failed
    test that ran Ray keeps the errors its actors logged (an engine dying inside an actor never reaches
    the test's own traceback)."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("CI") == "true" and rep.skipped and call.excinfo is not None \
            and "could not import" in str(call.excinfo.value):
        rep.outcome = "failed"
        rep.longrepr = f"CI: a dependency is missing ({call.excinfo.value}); scripts/setup_venv.sh installs it"
    if rep.failed and ("ray_local" in item.fixturenames or item.get_closest_marker("vllm")):
        _RAY_ERRORS[item.nodeid] = _ray_log_errors()
    if rep.failed:
        _FAILED_MODULES.add(item.module.__name__)


_RAY_ERRORS: dict[str, list[str]] = {}
_FAILED_MODULES: set[str] = set()
RAY_SESSIONS = Path("/tmp/ray")  # where a local `ray.init()` keeps its sessions (logs, spilled objects)
_ERROR_WORDS = ("Error", "Traceback", "Killed", "killed", "OOM", "Segmentation", "Illegal instruction", "died")


def _ray_log_errors(limit: int = 12) -> list[str]:
    """The last distinct error lines in the newest Ray session's actor and raylet logs."""
    logs = RAY_SESSIONS / "session_latest" / "logs"
    seen: dict[str, str] = {}
    for f in sorted(logs.glob("*.err")) + sorted(logs.glob("*.out")) if logs.is_dir() else []:
        try:
            lines = f.read_text(errors="replace").splitlines()[-400:]
        except OSError:
            continue
        for line in lines:
            if any(w in line for w in _ERROR_WORDS):
                seen[line.strip()[:300]] = f"worker pid {f.stem.rsplit('-', 1)[-1]}" if f.name.startswith("worker-") else f.name
    return [f"{name}: {line}" for line, name in list(seen.items())[-limit:]]


def pytest_terminal_summary(terminalreporter):
    """Printed last, so a CI log's tail shows the machine and what Ray's actors said before a failure."""
    if not _RAY_ERRORS:
        return
    flags = set()
    try:
        flags = {f for f in open("/proc/cpuinfo").read().split() if f in
                 ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")}
    except OSError:
        pass
    tr = terminalreporter
    tr.section("Ray actor errors of failed tests")
    tr.write_line(f"CPU flags: {' '.join(sorted(flags)) or 'unknown'}; cores: {os.cpu_count()}")
    for nodeid, lines in _RAY_ERRORS.items():
        tr.write_line(nodeid)
        for line in lines or [f"(no error lines in {RAY_SESSIONS}/session_latest/logs)"]:
            tr.write_line("  " + line)


def make_tiny_llama(seed: int = 0, hidden: int = 256, layers: int = 2, vocab: int = 512):
    """A random Llama small enough for exact-maths tests (hidden 256, 2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float().eval()
    return model


@pytest.fixture(scope="session")
def tiny_llama_base():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama(tiny_llama_base):
    return copy.deepcopy(tiny_llama_base)


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The real shipped model (SmolLM2-135M-Instruct), converted once into the cache."""
    from qdpo_ray.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


def save_tiny_model_dir(path, seed: int = 0):
    """A tiny random Llama (hidden 256, 2 layers) with the embedded model's tokenizer, as an HF directory."""
    from qdpo_ray.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-135m"))
    model = make_tiny_llama(seed=seed, vocab=len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def pids_with(cmdline_part: bytes) -> list[int]:
    """Processes whose command line contains `cmdline_part` (a Ray actor's class name, for kill tests)."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and cmdline_part in Path(f"/proc/{d}/cmdline").read_bytes():
                pids.append(int(d))
        except OSError:
            pass
    return pids


def synthetic_pairs(path, n: int = 16, seed: int = 0, vocab: int = 49152):
    """A pairs directory in the generate-pairs format with random token ids (for training mechanics)."""
    import pyarrow.parquet as pq
    import pyarrow as pa

    from qdpo_ray.generate.pairs import _schema, make_pair

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p = torch.randint(10, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(10, vocab, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist()
        r = c[:2] + torch.randint(10, vocab, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist()
        rows.append(make_pair({"id": f"s{i:03d}", "prompt_text": f"prompt {i}", "prompt_token_ids": p,
                               "chosen": "c", "rejected": "r", "chosen_token_ids": c, "rejected_token_ids": r,
                               "chosen_fp_gaps": [1.0] * len(c)}))
    (path / "pairs").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), path / "pairs" / "part-00000.parquet")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module, with more logical CPUs than a 2-core machine has cores: engine
    and training actors set their real thread counts themselves (qdpo_ray.cluster.ensure_ray).

    Never a Ray that something else started: Ray's own API auto-starts one with as many CPUs as the
    machine has cores (e.g. `ray.serve.llm.build_llm_deployment` reads the runtime context), and on 2
    cores two engine actors then hold every CPU while Ray Data's tasks wait forever (CI stop 14)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=6, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """A directory for one module's shared fixtures, removed with the module when all its tests passed
    (as pyproject's tmp_path_retention_policy does for each test's own tmp_path)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    if request.module.__name__ not in _FAILED_MODULES:
        shutil.rmtree(path, ignore_errors=True)


def _ray_sessions() -> set[Path]:
    return set(RAY_SESSIONS.glob("session_2*")) if RAY_SESSIONS.is_dir() else set()


@pytest.fixture(scope="module", autouse=True)
def _no_ray_outlives_its_module(request):
    """A Ray auto-started by a test (Ray APIs do that) is stopped with its module, not inherited by the next.
    The Ray sessions the module started (logs, spilled objects) go with it unless one of its tests failed:
    a full run starts dozens, and CI's disk is shared with two virtual environments."""
    before = _ray_sessions()
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if request.module.__name__ not in _FAILED_MODULES:
        for session in _ray_sessions() - before:
            shutil.rmtree(session, ignore_errors=True)
