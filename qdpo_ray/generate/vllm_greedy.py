"""Greedy decoding of token-id prompts with one vLLM engine, in a process of its own.

vLLM starts worker processes with `spawn`, which re-imports the caller's `__main__`; running it as
`python -m qdpo_ray.generate.vllm_greedy` keeps that safe from any host program (pytest, a notebook, a
CLI). Input and output are JSON files so that the exact prompt token ids travel unchanged.

    python -m qdpo_ray.generate.vllm_greedy --model DIR --inp prompts.json --out answers.json \
        --max-tokens 64 --dtype bfloat16 [--logprobs 2] [--beams 3] [--max-model-len 4096]

prompts.json: {"prompt_token_ids": [[...], ...]}
answers.json: {"token_ids": [[...], ...], "top_logprobs": [[[[id, lp], [id, lp]], ...], ...] | null,
               "engine_start_s": float, "generate_s": float, "engine_model": the directory vLLM loaded}

A packed W4 checkpoint runs as its dense π_q copy (cached) on CPUs whose vLLM build lacks the W4 kernel.
`--beams N` (N > 1) is vLLM's beam search instead of greedy (the best beam's tokens; no log-probs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _engine_kwargs(model: str, dtype: str, max_model_len: int, seed: int, beams: int = 1) -> dict:
    kw = dict(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=seed,
              trust_remote_code=False)
    if beams > 1:
        # vLLM's beam search asks the engine for one token at a time with the whole sequence as the prompt:
        # only prefix caching keeps that from re-reading every sequence at every step, and on CPU only with
        # small KV blocks (engine.py). 8 MT-Bench questions, beam 3, 128 tokens: 516 s → 158 s, same beams.
        import torch

        from qdpo_ray.generate.engine import CPU_PREFIX_BLOCK

        kw["enable_prefix_caching"] = True
        if not torch.cuda.is_available():
            kw["block_size"] = CPU_PREFIX_BLOCK
    return kw


def _runnable(model: str, dtype: str) -> str:
    """`model`, or its dense π_q copy when it is a packed checkpoint this CPU's vLLM cannot run (the same
    decision as every other engine: generate.engine.w4_engine_dir)."""
    from qdpo_ray.quant.export import is_quantized_dir

    if not is_quantized_dir(model):
        return model
    from qdpo_ray.config import VllmEngineConfig
    from qdpo_ray.generate.engine import w4_engine_dir
    from qdpo_ray.models import cache_dir

    import torch

    # a 16-bit GPU engine runs the packed checkpoint (vLLM's GPU W4A16 kernels), whatever this node's CPU lacks
    gpu = torch.cuda.is_available() and dtype != "float32"
    return w4_engine_dir(model, VllmEngineConfig(dtype=dtype, gpus_per_actor=1 if gpu else 0), cache_dir() / "dense")[0]


def run(model: str, prompt_token_ids: list[list[int]], max_tokens: int, dtype: str = "float16",
        logprobs: int | None = None, max_model_len: int = 2048, seed: int = 0, beams: int = 1) -> dict:
    from qdpo_ray.generate.engine import apply_w4a16_env

    apply_w4a16_env()
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import BeamSearchParams

    model = _runnable(model, dtype)
    t0 = time.time()
    llm = LLM(**_engine_kwargs(model, dtype, max_model_len, seed, beams))
    t1 = time.time()
    prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
    top = None
    if beams > 1:
        if logprobs:
            raise ValueError("beam search returns no per-token log-probs; ask for --logprobs with --beams 1")
        outs = llm.beam_search(prompts, BeamSearchParams(beam_width=beams, max_tokens=max_tokens))
        t2 = time.time()
        # a beam's tokens are the prompt's followed by the answer's
        token_ids = [list(o.sequences[0].tokens[len(ids):]) for o, ids in zip(outs, prompt_token_ids)]
        return {"token_ids": token_ids, "top_logprobs": None, "engine_start_s": t1 - t0, "generate_s": t2 - t1,
                "engine_model": model}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, seed=seed)
    outs = llm.generate(prompts, params, use_tqdm=False)
    t2 = time.time()
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    if logprobs:
        top = [[sorted(([tid, lp.logprob] for tid, lp in step.items()), key=lambda x: -x[1])[:logprobs]
                for step in o.outputs[0].logprobs] for o in outs]
    return {"token_ids": token_ids, "top_logprobs": top, "engine_start_s": t1 - t0, "generate_s": t2 - t1,
            "engine_model": model}


def engine_env() -> dict[str, str]:
    """This process's environment with what an offline engine process of `run` needs."""
    from qdpo_ray.generate.engine import apply_w4a16_env

    env = apply_w4a16_env(dict(os.environ))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if len(os.sched_getaffinity(0)) <= 4:
        # vLLM's CPU binding keeps a core for its scheduler process, which idles in an offline run: on
        # a 2-core machine that halves generation. Bigger machines keep vLLM's NUMA-aware default.
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def run_subprocess(model: str, prompt_token_ids: list[list[int]], max_tokens: int, dtype: str = "float16",
                   logprobs: int | None = None, timeout: float = 900, beams: int = 1,
                   max_model_len: int = 2048) -> dict:
    """`run` in a fresh Python process (safe to call from anywhere)."""
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.json", Path(d) / "out.json"
        inp.write_text(json.dumps({"prompt_token_ids": prompt_token_ids}))
        cmd = [sys.executable, "-m", "qdpo_ray.generate.vllm_greedy", "--model", model, "--inp", str(inp),
               "--out", str(out), "--max-tokens", str(max_tokens), "--dtype", dtype, "--beams", str(beams),
               "--max-model-len", str(max_model_len)]
        if logprobs:
            cmd += ["--logprobs", str(logprobs)]
        env = engine_env()
        # Its own process group holds the engine's processes too (vLLM's EngineCore and workers outlive a
        # killed parent and keep spinning): on Ctrl-C, a timeout or any error here the whole group goes.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        finally:
            try:  # whatever is left of the group: after a normal exit nothing; after a kill, the engine
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        return json.loads(out.read_text())


def _die_with_parent() -> None:
    """When the caller dies without cleaning up (SIGTERM, SIGKILL), or this process is sent SIGTERM, take this
    process group — the engine's processes with it — down too. Only as the leader of a group of its own
    (`run_subprocess` makes one)."""
    if os.getpgid(0) != os.getpid():
        return
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--inp", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=2048)
    a = p.parse_args(argv)
    _die_with_parent()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from qdpo_ray.generate.engine import apply_w4a16_env

    apply_w4a16_env()  # before vllm is imported: its env module reads the variable once
    ids = json.loads(Path(a.inp).read_text())["prompt_token_ids"]
    res = run(a.model, ids, a.max_tokens, a.dtype, a.logprobs, max_model_len=a.max_model_len, beams=a.beams)
    Path(a.out).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
