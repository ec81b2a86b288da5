"""Pair-generation throughput: vLLM engines vs batched HF `generate`, and the Ray pipeline with 1 vs 2 actors.

    python benchmarks/bench_pairs.py [--prompts 64] [--tokens 64] [--hf-batch 16] [--skip-pipeline]

Prints, measured side by side in one run on this machine:
  * generated tokens/s of HF transformers `generate` (batched, greedy, fp32 — the exact reference path)
    for the fp model and the W4 model (de-quantized weights);
  * generated tokens/s of one vLLM engine (bf16, greedy) for the fp model and the real packed W4 export,
    engine start-up excluded and reported separately;
  * the ratio vLLM / HF for each model;
  * end-to-end rows/s of `generate-pairs` (Ray Data + both engine pools, start-up included) with 1 and 2
    actors per model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-pipeline", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch

    from qdpo_ray.config import ModelConfig, PromptsConfig, QuantConfig, load_config
    from qdpo_ray.data import format_prompt, load_prompts
    from qdpo_ray.generate.hf import greedy_generate
    from qdpo_ray.generate.vllm_greedy import run_subprocess
    from qdpo_ray.models import checkpoint_dtype, load_model, load_tokenizer, resolve_model_path
    from qdpo_ray.quant.export import export_packed

    mcfg = ModelConfig(name=a.model)
    tok = load_tokenizer(mcfg)
    rows = load_prompts(PromptsConfig(source="builtin:train", limit=a.prompts)).rows
    ids = [format_prompt(tok, r["prompt"], mcfg) for r in rows]
    work = Path(tempfile.mkdtemp(prefix="bench-pairs-"))
    w4 = export_packed(load_model(mcfg), tok, QuantConfig(bits=4), work / "w4", storage_dtype=checkpoint_dtype(mcfg))
    res: dict = {"prompts": len(ids), "max_new_tokens": a.tokens, "threads": torch.get_num_threads()}

    for label, path in (("fp", resolve_model_path(a.model)), ("w4", str(w4))):
        m = load_model(path, dtype="float32")
        t = time.time()
        out = greedy_generate(m, tok, ids, a.tokens, a.hf_batch)
        hf_s = time.time() - t
        hf_tok = sum(len(x) for x in out)
        del m
        v = run_subprocess(path, ids, a.tokens, dtype=a.dtype)
        v_tok = sum(len(x) for x in v["token_ids"])
        res[label] = {"hf_tokens_per_s": hf_tok / hf_s, "vllm_tokens_per_s": v_tok / v["generate_s"],
                      "vllm_engine_start_s": v["engine_start_s"], "hf_s": hf_s, "vllm_generate_s": v["generate_s"]}
        res[label]["ratio_vllm_over_hf"] = res[label]["vllm_tokens_per_s"] / res[label]["hf_tokens_per_s"]
        print(label, json.dumps(res[label]), flush=True)

    if not a.skip_pipeline:
        import ray

        from qdpo_ray.generate.pairs import run_pairs

        for actors in (1, 2):
            ray.init(num_cpus=4 * actors + 4, include_dashboard=False)
            cfg = load_config(None, [f"out={work}/pairs-{actors}", f"model.name={a.model}", "prompts.source=builtin:train",
                                     f"prompts.limit={a.prompts}", f"pairs.max_new_tokens={a.tokens}",
                                     f"pairs.w4_dir={w4}", f"pairs.engine.num_actors={actors}",
                                     f"pairs.engine.dtype={a.dtype}", "pairs.engine.batch_size=8"])
            t = time.time()
            s = run_pairs(cfg)
            wall = time.time() - t
            ray.shutdown()
            res[f"pipeline_{actors}_actor"] = {"rows_per_s": s["pairs_generated"] / wall, "wall_s": wall,
                                               "generated_tokens": s["generated_tokens"]}
            print(f"pipeline {actors} actor(s)", json.dumps(res[f"pipeline_{actors}_actor"]), flush=True)
        res["pipeline_rows_per_s_ratio_2_over_1"] = (res["pipeline_2_actor"]["rows_per_s"]
                                                     / res["pipeline_1_actor"]["rows_per_s"])

    print("\nRESULT", json.dumps(res, indent=2))
    print(f"\nvLLM / HF generated tokens/s: fp {res['fp']['ratio_vllm_over_hf']:.2f}x, "
          f"W4 {res['w4']['ratio_vllm_over_hf']:.2f}x")


if __name__ == "__main__":
    main()
