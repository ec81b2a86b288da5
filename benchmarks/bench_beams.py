"""Beam search on a CPU vLLM engine: vLLM's default KV blocks vs the project's (prefix caching, 32-token blocks).

    python benchmarks/bench_beams.py [--model DIR] [--questions 8] [--beams 3] [--tokens 128]

vLLM's `LLM.beam_search` asks the engine for one token per step with each beam's whole sequence as the
prompt, so every step re-reads every sequence unless its prefix is found in the KV cache; vLLM caches full
blocks only, and a CPU block is 128 tokens. `vllm_greedy` therefore runs beam search with prefix caching on
and `engine.CPU_PREFIX_BLOCK`-token blocks. This prints, for the first `--questions` MT-Bench turn-1
prompts, the generation time of both settings (each in a fresh process, engine start-up reported apart),
their ratio, and whether the beams are identical. Default model: the embedded model's RTN W4 export
(made once under the run directory `--work`), the model the Table 5 ablation runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _variant(a) -> None:
    """One setting in this process: `default` = vLLM's own KV blocks, `project` = `vllm_greedy`'s."""
    import qdpo_ray.generate.vllm_greedy as V

    if a.variant == "default":  # the beam engine as the greedy one is built: vLLM's own KV blocks
        greedy_kwargs = V._engine_kwargs
        V._engine_kwargs = (lambda model, dtype, max_model_len, seed, beams=1:
                            greedy_kwargs(model, dtype, max_model_len, seed))
    ids = json.loads(Path(a.inp).read_text())
    r = V.run(a.model, ids, a.tokens, "float32", max_model_len=1024, beams=a.beams)
    Path(a.out).write_text(json.dumps({k: r[k] for k in ("token_ids", "engine_start_s", "generate_s")}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint directory (default: RTN W4 of the embedded model)")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--work", default="runs/bench-beams")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--inp", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        return _variant(a)

    from qdpo_ray.config import ModelConfig, QuantConfig
    from qdpo_ray.data import format_prompt
    from qdpo_ray.evaluate.judge import load_questions
    from qdpo_ray.generate.vllm_greedy import engine_env
    from qdpo_ray.models import load_tokenizer

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    mcfg = ModelConfig(name="smollm2-135m")
    model = a.model
    if model is None:
        from qdpo_ray.config import RunConfig
        from qdpo_ray.quant.export import ensure_rtn_checkpoint

        model = str(ensure_rtn_checkpoint(RunConfig(model=mcfg, quant=QuantConfig()), work / "w4-rtn"))
    tok = load_tokenizer(mcfg)
    ids = [format_prompt(tok, [q["turns"][0]], mcfg) for q in load_questions(limit=a.questions)]
    (work / "prompts.json").write_text(json.dumps(ids))
    res = {}
    for variant in ("default", "project"):
        out = work / f"{variant}.json"
        subprocess.run([sys.executable, __file__, "--variant", variant, "--model", model, "--inp",
                        str(work / "prompts.json"), "--out", str(out), "--beams", str(a.beams),
                        "--tokens", str(a.tokens)], check=True, env=engine_env())
        res[variant] = json.loads(out.read_text())
        r = res[variant]
        print(json.dumps({"variant": variant, "engine_start_s": round(r["engine_start_s"], 1),
                          "generate_s": round(r["generate_s"], 1), "tokens": sum(map(len, r["token_ids"]))}),
              flush=True)
    d, p = res["default"], res["project"]
    same = sum(x == y for x, y in zip(d["token_ids"], p["token_ids"]))
    print(f"\n{len(ids)} MT-Bench turn-1 prompts, beam {a.beams}, ≤ {a.tokens} tokens, fp32, {model}\n")
    print("| KV blocks | generate s | speed-up | beams identical |")
    print("|---|---|---|---|")
    print(f"| vLLM default (128 tokens on CPU) | {d['generate_s']:.1f} | 1.00× | |")
    print(f"| prefix caching, 32-token blocks (`vllm_greedy`) | {p['generate_s']:.1f} | "
          f"{d['generate_s'] / p['generate_s']:.2f}× | {same}/{len(ids)} |")


if __name__ == "__main__":
    main()
