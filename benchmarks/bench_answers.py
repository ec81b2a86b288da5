"""MT-Bench answer generation for the judge: fp32 transformers vs the vLLM answer engine, side by side.

    python benchmarks/bench_answers.py [--questions 16] [--tokens 64] [--batch 8]

Prints, measured in one run on this machine, for the fp model's turn-1 answers to the first `--questions`
MT-Bench questions (`--tokens` each at most):
  * generated tokens/s of `evaluate.judge.answer_engine=transformers` (fp32, batched `generate`);
  * generated tokens/s of one vLLM engine (`vllm_greedy`, engine start-up excluded and reported) for
    fp32 and fp16, each with vLLM's default CPU binding (a core reserved for its scheduler) and with
    no core reserved (what `vllm_greedy` does on machines of ≤ 4 cores);
  * each vLLM row's ratio to transformers, and whether its answers equal the fp32 transformers answers.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="transformers batch size (flips.batch_size)")
    a = ap.parse_args()

    from qdpo_ray.config import ModelConfig
    from qdpo_ray.data import format_prompt
    from qdpo_ray.evaluate.judge import load_questions
    from qdpo_ray.generate.hf import greedy_generate
    from qdpo_ray.generate.vllm_greedy import run_subprocess
    from qdpo_ray.models import load_model, load_tokenizer, resolve_model_path

    mcfg = ModelConfig(name=a.model)
    tok = load_tokenizer(mcfg)
    ids = [format_prompt(tok, [q["turns"][0]], mcfg) for q in load_questions(limit=a.questions)]
    model = load_model(mcfg, dtype="float32")
    t0 = time.time()
    ref = greedy_generate(model, tok, ids, a.tokens, a.batch)
    hf_s = time.time() - t0
    n_ref = sum(map(len, ref))
    rows = [{"engine": "transformers fp32", "tokens": n_ref, "generate_s": round(hf_s, 1),
             "tokens_per_s": round(n_ref / hf_s, 1), "ratio": 1.0, "same_answers": f"{len(ids)}/{len(ids)}"}]
    model_dir = resolve_model_path(a.model)
    for dtype in ("float32", "float16"):
        for reserved in ("1", "0"):
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
            r = run_subprocess(model_dir, ids, a.tokens, dtype)
            n = sum(map(len, r["token_ids"]))
            same = sum(x == y for x, y in zip(r["token_ids"], ref))
            rows.append({"engine": f"vLLM {dtype}, {reserved} core reserved", "tokens": n,
                         "engine_start_s": round(r["engine_start_s"], 1), "generate_s": round(r["generate_s"], 1),
                         "tokens_per_s": round(n / r["generate_s"], 1),
                         "ratio": round((n / r["generate_s"]) / (n_ref / hf_s), 2), "same_answers": f"{same}/{len(ids)}"})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{len(ids)} MT-Bench turn-1 prompts, ≤ {a.tokens} tokens, {os.cpu_count()} cores\n")
    print("| engine | tokens | generate s | tokens/s | × transformers | answers = fp32 transformers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['tokens']} | {r['generate_s']} | {r['tokens_per_s']} | {r['ratio']} | "
              f"{r['same_answers']} |")


if __name__ == "__main__":
    main()
