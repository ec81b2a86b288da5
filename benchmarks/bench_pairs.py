"""Pair-generation throughput: vLLM engines vs batched HF `generate`, and the Ray pipeline with 1 vs 2 actors.

    python benchmarks/bench_pairs.py [--prompts 64] [--tokens 64] [--hf-batch 16] [--skip-hf] [--skip-pipeline]
                                     [--anchored-lens 1,4,16] [--anchors 4] [--pairs-dtype auto]

Prints, measured side by side in one run on this machine:
  * generated tokens/s of HF transformers `generate` (batched, greedy, fp32 — the exact reference path)
    for the fp model and the W4 model (de-quantized weights);
  * generated tokens/s of one vLLM engine (bf16, greedy) for the fp model and the real packed W4 export,
    engine start-up excluded and reported separately;
  * the ratio vLLM / HF for each model;
  * end-to-end rows/s of `generate-pairs` (Ray Data + both engine pools, start-up included) with 1 and 2
    actors per model;
  * anchored vs natural `generate-pairs` on the same prompts and W4 export (1 actor per pool, fidelity
    check off): generated tokens/s of each (tokens the engines sampled — natural: chosen + rejected;
    anchored: each fp answer y once + the L-token rejected continuations — over the generation wall time,
    engine start-up included; both run two engine pools) and the ratio anchored / natural,
    for each L in --anchored-lens (empty: skip). Natural runs first and again last; the ratio is taken
    against the mean of the two (on a shared machine the load drifts). The pipeline runs take the pairs
    stage's own engine choice (`--pairs-dtype auto`: fp32 with a dense π_q where vLLM has no W4A16 kernel,
    as on AVX2-only CPUs; fp16 with the packed kernel) and print it (`w4_engine`, `engine_dtype`).
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
    ap.add_argument("--skip-hf", action="store_true", help="skip the HF vs vLLM engine comparison")
    ap.add_argument("--pairs-dtype", default="auto", help="pairs.engine.dtype of the pipeline runs (auto = the stage's choice)")
    ap.add_argument("--anchored-lens", default="1,4,16", help="continuation lengths L of anchored runs ('' = skip)")
    ap.add_argument("--anchors", type=int, default=4, help="pairs.anchors_per_prompt of anchored runs")
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

    for label, path in () if a.skip_hf else (("fp", resolve_model_path(a.model)), ("w4", str(w4))):
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
                                     f"pairs.engine.dtype={a.pairs_dtype}", "pairs.engine.batch_size=8"])
            t = time.time()
            s = run_pairs(cfg)
            wall = time.time() - t
            ray.shutdown()
            res[f"pipeline_{actors}_actor"] = {"rows_per_s": s["pairs_generated"] / wall, "wall_s": wall,
                                               "generated_tokens": s["generated_tokens"]}
            print(f"pipeline {actors} actor(s)", json.dumps(res[f"pipeline_{actors}_actor"]), flush=True)
        res["pipeline_rows_per_s_ratio_2_over_1"] = (res["pipeline_2_actor"]["rows_per_s"]
                                                     / res["pipeline_1_actor"]["rows_per_s"])

    lens = [int(x) for x in a.anchored_lens.split(",") if x.strip()]
    if lens:
        import ray

        from qdpo_ray.generate.pairs import run_pairs

        runs = ([("natural", [])]
                + [(f"anchored_L{n}", ["pairs.mode=anchored", f"pairs.continuation_len={n}",
                                       f"pairs.anchors_per_prompt={a.anchors}"]) for n in lens]
                + [("natural_again", [])])
        for label, extra in runs:
            ray.init(num_cpus=10, include_dashboard=False)
            cfg = load_config(None, [f"out={work}/{label}", f"model.name={a.model}", "prompts.source=builtin:train",
                                     f"prompts.limit={a.prompts}", f"pairs.max_new_tokens={a.tokens}", f"pairs.w4_dir={w4}",
                                     f"pairs.engine.dtype={a.pairs_dtype}", "pairs.engine.batch_size=8",
                                     "pairs.fidelity_sample=0", *extra])
            s = run_pairs(cfg)
            ray.shutdown()
            res[label] = {k: s.get(k) for k in ("tokens_per_s", "generated_tokens", "generation_wall_s", "pairs_generated",
                                                "pairs_kept", "removed", "anchors_per_prompt_mean",
                                                "flips_per_answer_mean", "flip_rate", "mean_rejected_len",
                                                "w4_engine", "engine_dtype")}
            print(label, json.dumps(res[label]), flush=True)
        natural = (res["natural"]["tokens_per_s"] + res["natural_again"]["tokens_per_s"]) / 2
        for n in lens:
            res[f"anchored_L{n}"]["ratio_tokens_per_s_over_natural"] = res[f"anchored_L{n}"]["tokens_per_s"] / natural

    print("\nRESULT", json.dumps(res, indent=2))
    if not a.skip_hf:
        print(f"\nvLLM / HF generated tokens/s: fp {res['fp']['ratio_vllm_over_hf']:.2f}x, "
              f"W4 {res['w4']['ratio_vllm_over_hf']:.2f}x")
    for n in lens:
        print(f"anchored (L={n}) / natural generated tokens/s: "
              f"{res[f'anchored_L{n}']['ratio_tokens_per_s_over_natural']:.2f}x")


if __name__ == "__main__":
    main()
