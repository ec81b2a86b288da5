"""The exported W4 checkpoint runs in a real vLLM engine and decodes what the fake-quant model decodes.

With AVX-512 the engine runs vLLM's packed W4A16 kernel; without it (vLLM's AVX2 build has no W4 kernel)
the dense de-quantized copy of the same checkpoint (qdpo_ray.quant.dense).

vLLM's CPU W4A16 kernel computes in bf16/fp16, the fake-quant reference in fp32, so a few near-tie
tokens may differ; we replay vLLM's tokens through the fp32 fake-quant model and require (a) most of
them to be its argmax, (b) every disagreement to be a near tie, and (c) the first tokens of most answers
to match exactly.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import pids_with

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

N_PROMPTS, MAX_TOKENS = 8, 32


@pytest.mark.parametrize("dtype", ["float16"])
def test_vllm_w4_matches_fake_quant(tmp_path, embedded_model_dir, dtype):
    from qdpo_ray.config import ModelConfig, PromptsConfig, QuantConfig
    from qdpo_ray.data import format_prompt, load_prompts
    from qdpo_ray.generate.hf import greedy_generate
    from qdpo_ray.generate.vllm_greedy import run_subprocess
    from qdpo_ray.models import checkpoint_dtype, load_model, load_tokenizer
    from qdpo_ray.quant.export import export_packed
    from qdpo_ray.quant.fake_quant import to_fake_quant

    qcfg = QuantConfig(bits=4)
    mcfg = ModelConfig(name=embedded_model_dir)
    tok = load_tokenizer(mcfg)
    fp = load_model(mcfg)
    out = export_packed(copy.deepcopy(fp), tok, qcfg, tmp_path / "w4", storage_dtype=checkpoint_dtype(mcfg))
    fq = to_fake_quant(fp, qcfg)

    prompts = load_prompts(PromptsConfig(source="builtin:eval", limit=N_PROMPTS)).prompts
    ids = [format_prompt(tok, p, mcfg) for p in prompts]
    res = run_subprocess(str(out), ids, MAX_TOKENS, dtype=dtype)
    assert len(res["token_ids"]) == N_PROMPTS
    # the packed checkpoint ran on vLLM's W4A16 kernel where this CPU's vLLM has it, else its dense copy
    assert (res["engine_model"] == str(out)) == torch.cpu._is_avx512_supported(), res["engine_model"]

    agree = total = exact_prefix = 0
    worst_gap = 0.0
    for p, v in zip(ids, res["token_ids"]):
        assert 0 < len(v) <= MAX_TOKENS
        with torch.no_grad():
            logp = fq(torch.tensor([p + v])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        top = logp.argmax(-1)
        chosen = logp.gather(1, torch.tensor(v).unsqueeze(1)).squeeze(1)
        gap = (logp.max(-1).values - chosen)
        agree += int((top == torch.tensor(v)).sum())
        total += len(v)
        worst_gap = max(worst_gap, float(gap.max()))
        exact_prefix += int(top[:4].tolist() == v[:4])
    rate = agree / total
    hf = greedy_generate(fq, tok, ids, MAX_TOKENS, batch_size=N_PROMPTS)
    identical = sum(a == b for a, b in zip(hf, res["token_ids"]))
    print(json.dumps({"dtype": dtype, "engine_model": res["engine_model"], "teacher_forced_agreement": rate, "tokens": total,
                      "worst_logprob_gap": worst_gap, "first4_exact": exact_prefix,
                      "identical_sequences": identical, "n": N_PROMPTS}))
    assert rate >= 0.97
    assert worst_gap < 0.1  # a disagreement is a near tie in the fp32 model, never a different answer
    assert exact_prefix >= N_PROMPTS - 1
    assert identical >= N_PROMPTS // 2


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("victim", ["engine_driver", "caller"])
def test_no_vllm_process_outlives_a_kill(tmp_path, embedded_model_dir, victim):
    """SIGTERM to `vllm_greedy`'s process (engine_driver), or to the program that called `run_subprocess`
    (caller), while the engine runs: none of the engine's processes is left. vLLM's EngineCore and Worker
    used to outlive a killed driver and spin."""
    caller = tmp_path / "caller.py"
    caller.write_text("from qdpo_ray.generate.vllm_greedy import run_subprocess\n"
                      f"run_subprocess({embedded_model_dir!r}, [[1, 2, 3]] * 8, 512, 'float32')\n")
    proc = subprocess.Popen([sys.executable, str(caller)], stderr=subprocess.DEVNULL)
    try:
        _kill_and_check(proc, victim)
    finally:
        proc.kill()


def _kill_and_check(proc, victim):
    deadline, chain = time.time() + 300, None
    while time.time() < deadline and chain is None:
        for pid in pids_with(b"VLLM::Worker"):  # other engines may run on this machine: follow the parents
            try:
                up = [pid]
                while up[-1] > 1 and up[-1] != proc.pid:
                    up.append(_ppid(up[-1]))
                if up[-1] == proc.pid:
                    chain = up[:-1]  # Worker, EngineCore, …, vllm_greedy (the caller's child)
            except (OSError, IndexError, ValueError):
                pass
        time.sleep(0.5)
    assert chain is not None, "no vLLM worker appeared under the caller"
    os.kill(chain[-1] if victim == "engine_driver" else proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and any(map(_alive, chain)):
        time.sleep(0.5)
    assert not [p for p in chain if _alive(p)], f"of the engine's processes {chain}, these outlived the kill"
