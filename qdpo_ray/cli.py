"""`qdpo-ray <stage>`: YAML config + `--section.key=value` overrides + a few short flags per stage.

    qdpo-ray quantize --model smollm2-135m --bits 4 [--group-size 64] [--symmetric] --out runs/w4
    qdpo-ray flips --model smollm2-135m --bits 4 --prompts builtin:eval --out runs/flips-w4
    qdpo-ray flips --config configs/flips.yaml --quant.bits=3 --quant.group_size=64
    qdpo-ray pipeline --config configs/default.yaml [--dry-run] [--train.lr=1e-5 ...]

Short flags are spellings of config fields (`--bits` is `--quant.bits`); the config reference is
docs/configuration.md. Errors in the user's input print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from qdpo_ray.config import ConfigError, RunConfig, load_config

# short flag → (dotted field, argparse kwargs)
_SHORT: dict[str, tuple[str, dict]] = {
    "--model": ("model.name", {"help": "HF model id, local dir, or smollm2-135m"}),
    "--bits": ("quant.bits", {"type": int, "help": "weight bits (2-8, 16 = unquantized)"}),
    "--group-size": ("quant.group_size", {"type": int, "help": "group size (default: per channel)"}),
    "--symmetric": ("quant.symmetric", {"action": "store_const", "const": True, "help": "symmetric quantization"}),
    "--out": ("out", {"help": "output directory"}),
    "--prompts": ("prompts.source", {"help": "builtin:train|builtin:eval|mtbench|FILE|hf:ID"}),
    "--limit": ("prompts.limit", {"type": int, "help": "use the first N prompts"}),
    "--max-new-tokens": ("flips.max_new_tokens", {"type": int, "help": "greedy tokens per answer"}),
    "--seed": ("seed", {"type": int}),
    "--w4": ("pairs.w4_dir", {"help": "ready quantized checkpoint directory"}),
    "--answer-tokens": ("pairs.max_new_tokens", {"type": int, "help": "greedy tokens per answer"}),
    "--actors": ("pairs.engine.num_actors", {"type": int, "help": "vLLM engines per model"}),
    "--pairs": ("train.pairs", {"help": "pairs directory from generate-pairs"}),
    "--objective": ("train.objective", {"help": "qdpo | qdpo+kd | qdpo+sft | qdpo_flips | qdpo_flips+kd | kd | dpo_fp_ref"}),
    "--lr": ("train.lr", {"type": float}),
    "--max-steps": ("train.max_steps", {"type": int}),
    "--workers": ("train.num_workers", {"type": int, "help": "Ray Train workers"}),
    "--lora": ("train.lora.enabled", {"action": "store_const", "const": True, "help": "QDPO + LoRA"}),
    "--fp": ("serve.fp_model", {"help": "fp model to serve (default: model.name)"}),
    "--host": ("serve.host", {"help": "bind address (default 127.0.0.1)"}),
    "--port": ("serve.port", {"type": int, "help": "HTTP port (default 8000)"}),
    "--dry-run": ("pipeline.dry_run", {"action": "store_const", "const": True,
                                       "help": "print the stage plan (run / skip / resume, and why) and exit"}),
    "--verbose": ("pipeline.verbose", {"action": "store_const", "const": True,
                                       "help": "print every log line (Ray, vLLM, DeepSpeed) instead of only "
                                               "one line per stage and step"}),
}

# A short flag that means another field in one stage (`serve --w4` is the checkpoint to serve).
_STAGE_SHORT: dict[str, dict[str, tuple[str, dict]]] = {
    "serve": {"--w4": ("serve.w4_dir", {"help": "quantized checkpoint to serve (default: RTN export of --fp)"})},
}


def _short(stage: str, flag: str) -> tuple[str, dict]:
    return _STAGE_SHORT.get(stage, {}).get(flag) or _SHORT[flag]


_STAGE_FLAGS = {
    "quantize": ["--model", "--bits", "--group-size", "--symmetric", "--out", "--seed"],
    "flips": ["--model", "--bits", "--group-size", "--symmetric", "--out", "--prompts", "--limit",
              "--max-new-tokens", "--seed"],
    "generate-pairs": ["--model", "--bits", "--group-size", "--symmetric", "--out", "--prompts", "--limit",
                       "--w4", "--answer-tokens", "--actors", "--seed"],
    "evaluate": ["--model", "--bits", "--group-size", "--symmetric", "--out", "--prompts", "--limit",
                 "--max-new-tokens", "--seed"],
    "train": ["--model", "--bits", "--group-size", "--symmetric", "--out", "--pairs", "--objective", "--lr",
              "--max-steps", "--workers", "--lora", "--seed", "--verbose"],
    "pipeline": ["--model", "--bits", "--group-size", "--symmetric", "--out", "--answer-tokens", "--actors",
                 "--objective", "--lr", "--max-steps", "--workers", "--lora", "--seed", "--dry-run", "--verbose"],
    "serve": ["--fp", "--w4", "--bits", "--group-size", "--symmetric", "--host", "--port", "--out", "--seed"],
}


def _cmd_quantize(cfg: RunConfig) -> int:
    from qdpo_ray.quant.export import run_quantize

    out = run_quantize(cfg)
    print(f"wrote {cfg.quant.label} checkpoint to {out}")
    print(f"serve it with: qdpo-ray serve --w4 {out}   (or on a GPU: vllm serve {out} --dtype float16; "
          "on a CPU vLLM's W4 kernel needs AVX-512 and VLLM_CPU_INT4_W4A8=0, see docs/serving.md)")
    return 0


def _cmd_flips(cfg: RunConfig) -> int:
    from qdpo_ray.evaluate.flips import run_flips

    s = run_flips(cfg)
    print(json.dumps({k: s[k] for k in ("quant", "n_prompts", "n_tokens", "n_flips", "flip_rate",
                                        "prompts_with_flip", "mean_first_flip_position",
                                        "mean_margin_flipped", "mean_margin_unflipped")}, indent=2))
    print(f"wrote {cfg.out}/summary.json, tokens.parquet, margins.png")
    return 0


def _cmd_pairs(cfg: RunConfig) -> int:
    from qdpo_ray.generate.pairs import run_pairs

    s = run_pairs(cfg)
    print(format_pairs_summary(s))
    print(f"wrote {cfg.out}/pairs/ ({s['pairs_kept']} pairs) and {cfg.out}/summary.json")
    return 0


def format_pairs_summary(s: dict) -> str:
    md = s["mean_first_divergence"]
    tps = s["tokens_per_s_per_engine"]
    lines = [
        f"prompts            {s['prompts']}  (skipped: {s['skipped_empty']} empty, {s['skipped_too_long']} too long)",
        f"pairs generated    {s['pairs_generated']}  ({s['generated_this_run']} this run)",
        f"pairs kept         {s['pairs_kept']}  removed: " + ", ".join(f"{k} {v}" for k, v in s["removed"].items()),
        f"identical rate     {s['identical_rate']:.1%}",
        f"mean first div.    {md:.1f} tokens" if md is not None else "mean first div.    -",
        f"tokens/s/engine    {tps:.1f}" if tps else "tokens/s/engine    - (nothing generated this run)",
        f"wall time          {s['wall_s']:.0f} s (generation {s['generation_wall_s']:.0f} s)",
    ]
    return "\n".join(lines)


def _cmd_train(cfg: RunConfig) -> int:
    from pathlib import Path

    from qdpo_ray.console import quiet_console, watch_progress
    from qdpo_ray.train.rounds import run_rounds

    # One line per optimizer step on the terminal; Ray's, DeepSpeed's and the workers' logs go to a file.
    out = Path(cfg.out).resolve()
    with quiet_console(out / "logs" / "train.log", enabled=not cfg.pipeline.verbose) as echo, \
            watch_progress(out, echo, "[train] "):
        s = run_rounds(cfg)
    f, n = s["final"] or {}, len(s["rounds"])
    rounds = {"rounds": [{k: r.get(k) for k in ("round", "export", "codes_moved")} for r in s["rounds"]]}
    print(json.dumps({"objective": s["objective"], "steps": s["steps"], "pairs": s["pairs"],
                      **{k: f.get(k) for k in ("loss", "rewards/margins", "rewards/accuracies")},
                      "trainable_params": s["trainable_params"], "export": s.get("export"),
                      **(rounds if n > 1 else {})}, indent=2))
    print(f"wrote {cfg.out}/metrics.csv, training.png, tensorboard/, summary.json"
          + (f"; rounds 2-{n} the same in {cfg.out}/round-*/" if n > 1 else ""))
    return 0


def _cmd_evaluate(cfg: RunConfig) -> int:
    from qdpo_ray.evaluate.compare import results_table, run_evaluate

    print(results_table(run_evaluate(cfg)))
    print(f"wrote {cfg.out}/results.json, results.md, samples.jsonl, comparison.png"
          + (f"; MT-Bench answers in {cfg.out}/answers/, the judge's report in {cfg.out}/judge/"
             if cfg.evaluate.judge else ""))
    return 0


def _cmd_pipeline(cfg: RunConfig) -> int:
    from qdpo_ray.pipeline import dry_run_text, run_pipeline

    if cfg.pipeline.dry_run:
        print(dry_run_text(cfg))
        return 0
    from pathlib import Path

    from qdpo_ray.console import quiet_console

    with quiet_console(Path(cfg.out).resolve() / "logs" / "pipeline.log", enabled=not cfg.pipeline.verbose) as echo:
        r = run_pipeline(cfg, echo)
    print(f"pipeline finished in {r['wall_s']:.0f} s: " + ", ".join(f"{s['stage']} {s['status']}" for s in r["stages"]))
    if r["report"]:
        print(f"report: {r['report']}/README.md")
    if r["serve"]:
        print(f"serve the result with:\n  {r['serve']}")
    return 0


def _cmd_serve(cfg: RunConfig) -> int:
    from qdpo_ray.serve.app import run_serve

    run_serve(cfg)
    return 0


_COMMANDS: dict[str, tuple[Callable[[RunConfig], int], str]] = {
    "quantize": (_cmd_quantize, "RTN-quantize a model and export a packed (compressed-tensors) checkpoint"),
    "flips": (_cmd_flips, "measure token flips of the quantized model against the fp model"),
    "evaluate": (_cmd_evaluate, "compare quantized/trained models with the fp model: flips, ROUGE-L, exact match, perplexity, "
                 "MT-Bench judge"),
    "train": (_cmd_train, "train the quantized model with QDPO (or KD) on Ray Train + DeepSpeed"),
    "generate-pairs": (_cmd_pairs, "generate (fp answer, quantized answer) preference pairs with Ray Data + vLLM"),
    "serve": (_cmd_serve, "serve the fp and W4 models (OpenAI API, /compare, comparison page) with Ray Serve"),
    "pipeline": (_cmd_pipeline, "quantize → flips → pairs → QDPO training → W4 export → evaluation → report, "
                 "skipping stages already done for the same config"),
}


def _cmd_judge(cfg: RunConfig) -> int:
    from qdpo_ray.evaluate.judge import judge_markdown, run_judge

    print(judge_markdown(run_judge(cfg)))
    print(f"wrote {cfg.out}/judge.json, judge.md, judge.png")
    return 0


_COMMANDS["judge"] = (_cmd_judge, "MT-Bench LLM judge of answers files on an OpenAI-compatible endpoint: "
                      "pairwise vs the baseline (both orders) and 1-10 grading")
_STAGE_FLAGS["judge"] = ["--out"]


def _cmd_breakdown(cfg: RunConfig) -> int:
    from qdpo_ray.evaluate.breakdown import breakdown_table, run_breakdown

    r = run_breakdown(cfg)
    print(breakdown_table(r))
    print(f"wrote {cfg.out}/README.md, results.json and per model samples.jsonl, scores.parquet, "
          "breakdown.png, sorted.png")
    return 0


_COMMANDS["breakdown"] = (_cmd_breakdown, "breakdown analysis (paper Fig. 2): flipped token x KV cache x "
                          "continuing model, 8 cases scored with ROUGE against the fp answer")
_STAGE_SHORT["breakdown"] = {
    "--max-new-tokens": ("breakdown.max_new_tokens", {"type": int, "help": "tokens searched for the first "
                                                      "divergence and continued from it (default 64)"}),
    "--checkpoint": ("breakdown.checkpoints", {"action": "append", "help": "quantized checkpoint dir "
                                               "analysed too (repeatable)"}),
}
_STAGE_FLAGS["breakdown"] = ["--model", "--bits", "--group-size", "--symmetric", "--out", "--prompts", "--limit",
                             "--max-new-tokens", "--checkpoint", "--seed"]


def _cmd_ptq(cfg: RunConfig) -> int:
    from qdpo_ray.quant.ptq import run_ptq

    out = run_ptq(cfg)
    print(f"wrote {cfg.ptq.method.upper()} {cfg.quant.label} checkpoint (llm-compressor) to {out}")
    print(f"compare it: qdpo-ray evaluate --config configs/evaluate.yaml --evaluate.models.{cfg.ptq.method}={out}")
    return 0


_COMMANDS["ptq"] = (_cmd_ptq, "AWQ / GPTQ baseline with llm-compressor (its own environment: "
                    "scripts/setup_llmcompressor_venv.sh) on the quant section's grid")
_STAGE_SHORT["ptq"] = {"--method": ("ptq.method", {"help": "awq | gptq"})}
_STAGE_FLAGS["ptq"] = ["--model", "--bits", "--group-size", "--symmetric", "--method", "--out", "--seed"]


def _cmd_convert(cfg: RunConfig) -> int:
    from qdpo_ray.convert import convert_to_safetensors

    out = convert_to_safetensors(cfg.model.name, cfg.out, revision=cfg.model.revision)
    print(f"wrote a safetensors copy of {cfg.model.name} to {out}; use it with --model {out} "
          f"(or model.name: {out})")
    return 0


_COMMANDS["convert"] = (_cmd_convert, "rewrite a checkpoint with PyTorch .bin weights only as safetensors "
                        "(read with torch.load(weights_only=True), same shards), the format every stage loads")
_STAGE_FLAGS["convert"] = ["--model", "--out"]


def _cmd_plan(cfg: RunConfig, opts: argparse.Namespace) -> int:
    from qdpo_ray.plan import run_plan

    text, stages = run_plan(cfg, opts.plan_model_config, opts.plan_gpu_memory_gib, opts.plan_gpus_per_node)
    print(text)
    misfits = [s.stage for s in stages if not s.fits]
    if misfits:
        print(f"qdpo-ray plan: {', '.join(misfits)} would not fit a {opts.plan_gpu_memory_gib:g} GiB GPU "
              "(see the WARNING lines)", file=sys.stderr)
    return 1 if misfits and opts.plan_strict else 0


_COMMANDS["plan"] = (_cmd_plan, "GPUs, nodes, memory per GPU, disk and a time range for every stage of a run, "
                     "from the model's config alone (no weights, no GPU)")
_STAGE_FLAGS["plan"] = ["--model", "--bits", "--group-size", "--symmetric", "--out", "--answer-tokens", "--actors",
                        "--objective", "--workers", "--lora"]
# Options of a command itself, not config fields: the command gets them as its second argument.
_OPTIONS: dict[str, list[tuple[str, dict]]] = {"plan": [
    ("--model-config", {"dest": "plan_model_config", "metavar": "PATH", "help": "the model's config.json, for hub ids the "
                        "project ships no config of (default: looked up by model.name)"}),
    ("--gpu-memory-gib", {"dest": "plan_gpu_memory_gib", "metavar": "GIB", "type": float, "default": 80.0,
                          "help": "memory of one GPU in GiB (default 80)"}),
    ("--gpus-per-node", {"dest": "plan_gpus_per_node", "metavar": "N", "type": int, "default": 8,
                         "help": "GPUs per node (default 8)"}),
    ("--strict", {"dest": "plan_strict", "action": "store_true",
                  "help": "exit with status 1 when a stage would not fit a GPU"}),
]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qdpo-ray", description="Quantization-aware DPO on Ray.",
                                epilog="Any config field can be set as --section.key=value.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_,
                            epilog="Any config field can be set as --section.key=value, e.g. --quant.bits=3.")
        sp.add_argument("--config", help="YAML config file (see configs/)")
        for flag in _STAGE_FLAGS[name]:
            field, kwargs = _short(name, flag)
            sp.add_argument(flag, dest=field, default=None, **kwargs)
        for flag, kwargs in _OPTIONS.get(name, []):
            sp.add_argument(flag, **kwargs)
    return p


def resolve(argv: list[str]) -> tuple[str, RunConfig, bool]:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])
           and not (a.startswith("--") and a.split("=", 1)[0][2:] in RunConfig.model_fields)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --section.key=value)")
    overrides = list(rest)
    for flag in _STAGE_FLAGS[args.command]:
        field = _short(args.command, flag)[0]
        value = getattr(args, field, None)
        if value is not None:
            overrides.append(f"{field}={json.dumps(value) if not isinstance(value, str) else value}")
    return args.command, load_config(args.config, overrides), args.verbose


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, cfg, verbose = resolve(argv)
    except ConfigError as e:
        print(f"qdpo-ray: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        if command in _OPTIONS:
            return _COMMANDS[command][0](cfg, build_parser().parse_known_args(argv)[0])
        return _COMMANDS[command][0](cfg)
    except ConfigError as e:
        print(f"qdpo-ray {command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
