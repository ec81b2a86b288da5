"""Compare quantized models with the fp model on held-out prompts (issue: "does QDPO help?").

For every model (the fp reference, RTN of it, and any trained/exported checkpoints):
  flip_rate      teacher-force the fp greedy answer; share of positions whose argmax differs (paper §3.1)
  rouge_l        ROUGE-L F1 of the model's own greedy answer against the fp answer (paper Fig. 2)
  exact_match    share of prompts whose greedy answer equals the fp answer token for token
  perplexity     on a text set the models were not trained on (MT-Bench's GPT-4 reference answers)
All models run in fp32 through transformers (a packed W4 directory is de-quantized on load), so the
numbers differ from the fp model only by the weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from qdpo_ray.chat_templates import stored_chat_template
from qdpo_ray.config import ConfigError, RunConfig
from qdpo_ray.data import format_prompt, load_prompts, mtbench_path
from qdpo_ray.evaluate.answers import (Generate, answer_task_options, mtbench_answers, transformers_generator,
                                       vllm_dtype, vllm_generator)
from qdpo_ray.evaluate.flips import top2_margin
from qdpo_ray.evaluate.judge import judge_answers, load_answers, load_questions, save_answers, write_judge_report
from qdpo_ray.evaluate.stats import differences, differences_table
from qdpo_ray.generate.fp_answers import fp_greedy_answers
from qdpo_ray.generate.hf import greedy_generate, teacher_forced
from qdpo_ray.io import atomic_path, atomic_write_json, atomic_write_text
from qdpo_ray.models import load_model, load_tokenizer, resolve_model_path
from qdpo_ray.quant.dense import checkpoint_digest
from qdpo_ray.quant.export import ensure_rtn_checkpoint
from qdpo_ray.quant.fake_quant import quantize_model_rtn
from qdpo_ray.text_metrics import rouge_l


def perplexity_texts(limit: int | None = None) -> list[str]:
    path = mtbench_path().parent / "reference_answer" / "gpt-4.jsonl"
    texts = [t for line in path.read_text().splitlines() if line.strip()
             for t in json.loads(line)["choices"][0]["turns"] if t.strip()]
    return texts[:limit] if limit else texts


def _corpus_texts(spec: str) -> list[str]:
    """Texts of a perplexity corpus: `hf:<dataset>[:<config>]` (test split, `text` column) or a local
    .txt file / .jsonl file with a `text` field."""
    if spec.startswith("hf:"):
        from datasets import load_dataset

        name, _, config = spec[3:].partition(":")
        try:
            ds = load_dataset(name, config or None, split="test")
        except Exception as e:  # noqa: BLE001 - offline machines, unknown names: one clear message
            raise ConfigError(f"evaluate.perplexity_corpus={spec!r}: cannot load it ({type(e).__name__}: "
                              f"{str(e)[:200]}); offline, use mtbench or a local .txt/.jsonl file") from None
        return list(ds["text"])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"evaluate.perplexity_corpus={spec!r}: no such file (mtbench, hf:<dataset>[:<config>], "
                          "or a .txt / .jsonl file)")
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return [path.read_text()]


def perplexity_windows(tok, spec: str, limit: int | None = None, max_len: int = 512) -> tuple[list[list[int]], str]:
    """(token windows, description). `mtbench`: each GPT-4 reference answer is one window (truncated to
    `max_len`), the offline default. A corpus (WikiText-2: `hf:wikitext:wikitext-2-raw-v1`) is read as one
    stream, joined with blank lines and cut into `max_len`-token windows, the usual corpus perplexity.
    `limit` keeps the first N texts or windows."""
    if spec == "mtbench":
        texts = perplexity_texts(limit)
        return ([tok(t).input_ids[:max_len] for t in texts], f"MT-Bench GPT-4 reference answers ({len(texts)})")
    ids = tok("\n\n".join(t for t in _corpus_texts(spec) if t.strip())).input_ids
    windows = [w for w in (ids[i:i + max_len] for i in range(0, len(ids), max_len)) if len(w) > 1][:limit]
    return windows, f"{spec} ({len(windows)} windows of ≤ {max_len} tokens)"


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) over every window; a window's first token is context only."""
    nll, n = 0.0, 0
    for w in windows:
        if len(w) < 2:
            continue
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    return math.exp(nll / max(1, n))


def _model(label: str, spec: str, fp, cfg: RunConfig):
    if label == "fp":
        return fp
    if spec == "rtn":
        return quantize_model_rtn(copy.deepcopy(fp), cfg.quant)
    if _is_adapter(spec):
        # A QDPO + LoRA adapter, unmerged on the RTN base it was trained on (Q(W)x + BAx): the model as
        # trained. Merging and re-quantizing can round a small BA away (see docs/training.md).
        from peft import PeftModel

        return PeftModel.from_pretrained(quantize_model_rtn(copy.deepcopy(fp), cfg.quant), spec).eval()
    return load_model(spec, dtype="float32")


def _is_adapter(spec: str) -> bool:
    return (Path(spec) / "adapter_config.json").is_file()


def run_evaluate(cfg: RunConfig) -> dict[str, Any]:
    """Evaluate `cfg.evaluate.models` (label → "rtn" or a checkpoint) against the fp model `cfg.model`."""
    models, ppl_texts = cfg.evaluate.models, cfg.evaluate.perplexity_texts
    judge = cfg.evaluate.judge
    if judge and judge.answer_engine == "vllm":
        answer_task_options(judge.engine, cfg.seed)  # a setting the answer engine cannot take: before any work
        for label, spec in models.items():
            if _is_adapter(spec) and label not in judge.answers:
                raise ConfigError(f"evaluate.models.{label}={spec!r} is a LoRA adapter, which the vLLM answer engine "
                                  "does not run; set --evaluate.judge.answer_engine=transformers")
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg.prompts)
    tok = load_tokenizer(cfg.model)
    fp = load_model(cfg.model, dtype="float32")
    ids = [format_prompt(tok, p, cfg.model) for p in prompts.prompts]
    n_tok = cfg.flips.max_new_tokens
    fp_answers = fp_greedy_answers(fp, tok, ids, n_tok, cfg.flips.batch_size, cfg.model)
    fp_text = [tok.decode(a, skip_special_tokens=True) for a in fp_answers]
    windows, ppl_label = perplexity_windows(tok, cfg.evaluate.perplexity_corpus, ppl_texts)
    questions = load_questions(judge.questions, judge.questions_limit, judge.categories) if judge else []
    mt_answers: dict[str, dict] = {}

    results: dict[str, Any] = {}
    per_prompt: dict[str, dict[str, list]] = {}
    samples: dict[str, list[str]] = {"fp": fp_text}
    for label, spec in {"fp": cfg.model.name, **models}.items():
        m = _model(label, spec, fp, cfg)
        flips = [int((top2_margin(lg)[0] != torch.tensor(a)).sum())
                 for a, lg in zip(fp_answers, teacher_forced(m, ids, fp_answers, cfg.flips.batch_size, tok.pad_token_id or 0))]
        answers = fp_answers if label == "fp" else greedy_generate(m, tok, ids, n_tok, cfg.flips.batch_size)
        text = [tok.decode(a, skip_special_tokens=True) for a in answers]
        samples[label] = text
        rouge = list(map(rouge_l, text, fp_text))
        per_prompt[label] = {"flips": flips, "rouge_l": rouge}
        results[label] = {
            "model": spec, "flip_rate": sum(flips) / max(1, sum(map(len, fp_answers))),
            "rouge_l": sum(rouge) / len(text),
            "exact_match": sum(a == b for a, b in zip(answers, fp_answers)) / len(answers),
            "perplexity": perplexity(m, windows),
            "mean_answer_tokens": sum(len(a) for a in answers) / len(answers),
        }
        if judge and label not in judge.answers:
            mt_answers[label] = _judge_answers_of(m, tok, label, spec, questions, cfg, out / "answers")
        if m is not fp:
            del m
    report = {"prompts": cfg.prompts.source, "n_prompts": len(ids), "max_new_tokens": n_tok,
              "quant": cfg.quant.label, "perplexity_texts": ppl_label,
              "models": results, "differences": differences(per_prompt, [len(a) for a in fp_answers]),
              "per_prompt": {"ids": [r["id"] for r in prompts.rows], "tokens": [len(a) for a in fp_answers],
                             **per_prompt}}
    if judge:
        mt_answers.update({label: load_answers(path) for label, path in judge.answers.items()})
        jr = judge_answers(judge, mt_answers, baseline=judge.baseline, questions=questions,
                           cache_path=judge.cache or out / "judge_cache.jsonl")
        write_judge_report(jr, out / "judge")
        report["judge"] = judge_summary(jr)
        for label, j in report["judge"]["models"].items():
            if label in results:  # a model judged from an answers file only stays in report["judge"]
                results[label].update(j)
    report["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", results_table(report))
    _write_samples(out / "samples.jsonl", prompts.rows, samples)
    _plot(report, out / "comparison.png")
    return report


def _judge_answers_of(model, tok, label: str, spec: str, questions, cfg: RunConfig, folder: Path) -> dict:
    """`label`'s MT-Bench answers: generated once per (weights, generation settings, questions), then
    read back from `folder/<label>.jsonl` (a long evaluation resumes without regenerating them)."""
    judge = cfg.evaluate.judge
    weights = checkpoint_digest(spec) if Path(spec, "config.json").is_file() and list(Path(spec).glob("*.safetensors")) \
        else {"spec": spec, "model": cfg.model.model_dump(mode="json"), "quant": cfg.quant.model_dump(mode="json")}
    key = {"weights": weights, "max_new_tokens": judge.answer_max_new_tokens, "num_beams": judge.num_beams,
           "engine": judge.answer_engine if judge.answer_engine == "transformers" else f"vllm/{vllm_dtype(judge.engine)}",
           "turns": max(judge.turns), "questions": [[q["question_id"], q["turns"]] for q in questions],
           "chat": [stored_chat_template(cfg.model.chat_template), cfg.model.system_prompt]}
    path, key_path = folder / f"{label}.jsonl", folder / f"{label}.key.json"
    if path.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
        return load_answers(path)
    answers = mtbench_answers(_answer_generator(model, tok, label, spec, cfg, folder.parent), tok, questions,
                              cfg.model, max(judge.turns))
    save_answers(path, answers, model=spec)
    atomic_write_json(key_path, key)
    return answers


def _answer_generator(model, tok, label: str, spec: str, cfg: RunConfig, out: Path) -> Generate:
    judge = cfg.evaluate.judge
    if judge.answer_engine == "transformers":
        return transformers_generator(model, tok, judge.answer_max_new_tokens, cfg.flips.batch_size, judge.num_beams)
    # the engine loads weights from disk: fp's own directory, RTN exported once into the run directory
    model_dir = (resolve_model_path(cfg.model.name) if label == "fp"
                 else ensure_rtn_checkpoint(cfg, out / "w4-rtn") if spec == "rtn" else spec)
    return vllm_generator(model_dir, judge.answer_max_new_tokens, judge.num_beams, judge.engine, cfg.seed)


def judge_summary(jr: dict[str, Any]) -> dict[str, Any]:
    """Per model: the paper's and FastChat's lose-rate against the baseline, and the single-grade average."""
    models: dict[str, dict[str, Any]] = {}
    for label, e in jr["pairwise"].items():
        models[label] = {"judge_lose_rate": e["paper"]["lose_rate"], "judge_lose_rate_fastchat": e["fastchat"]["lose_rate"],
                         "judge_wtl": [e["paper"]["win"], e["paper"]["tie"], e["paper"]["loss"]]}
    for label, e in jr["single"].items():
        models.setdefault(label, {})["judge_single"] = e["average"]
    for label, e in jr.get("agreement", {}).items():
        models.setdefault(label, {})["mtbench_rouge_l"] = e["rouge_l"]
    return {"judge_model": jr["judge"]["model"], "baseline": jr["baseline"], "questions": jr["questions"],
            "turns": jr["turns"], "errors": jr["errors"], "stopped": jr.get("stopped"),
            "judged": bool(jr["pairwise"] or jr["single"]), "models": models}


def gap_closed(report: dict[str, Any], label: str, baseline: str = "rtn") -> dict[str, float] | None:
    """Share of the baseline→fp gap that `label` closed, per metric (1 = as good as fp, < 0 = worse
    than the baseline): flip rate and ROUGE-L, whose fp values are 0 and 1 by definition."""
    m = report["models"]
    if label not in m or baseline not in m:
        return None
    b, x = m[baseline], m[label]
    out = {}
    if b["flip_rate"] > 0:
        out["flip_rate"] = (b["flip_rate"] - x["flip_rate"]) / b["flip_rate"]
    if b["rouge_l"] < 1:
        out["rouge_l"] = (x["rouge_l"] - b["rouge_l"]) / (1 - b["rouge_l"])
    return out


def gap_sentence(report: dict[str, Any], baseline: str = "rtn") -> str:
    """One sentence per trained model: how much of the RTN→fp gap it closed on the held-out prompts."""
    parts = []
    for label in report["models"]:
        if label in ("fp", baseline):
            continue
        g = gap_closed(report, label, baseline)
        if g and "flip_rate" in g and "rouge_l" in g:
            r = report["models"][label]
            parts.append(f"**{label}** closed {g['flip_rate']:.0%} of the {baseline.upper()}→fp gap in flip rate "
                         f"({report['models'][baseline]['flip_rate']:.1%} → {r['flip_rate']:.1%}) and "
                         f"{g['rouge_l']:.0%} of it in ROUGE-L to fp "
                         f"({report['models'][baseline]['rouge_l']:.3f} → {r['rouge_l']:.3f}).")
    return " ".join(parts)


def results_table(report: dict[str, Any]) -> str:
    j = report.get("judge")
    lines = [f"Held-out prompts: `{report['prompts']}` ({report['n_prompts']}), greedy {report['max_new_tokens']} tokens; "
             f"perplexity on {report['perplexity_texts']}."
             + ((f" Judge: `{j['judge_model']}` on {j['questions']} MT-Bench questions, turns {j['turns']}, against "
                 f"{j['baseline']} (lose-rate: paper rule, FastChat rule in brackets; single: mean 1-10 grade; "
                 f"MT-Bench ROUGE-L: the answers' ROUGE-L to {j['baseline']}'s)." if j.get("judged", True) else
                 f" MT-Bench answers to {j['questions']} questions, turns {j['turns']}, no judge asked (modes: []): "
                 f"MT-Bench ROUGE-L is the answers' ROUGE-L to {j['baseline']}'s.")
                if j else ""), "",
             "| model | flip rate ↓ | ROUGE-L to fp ↑ | exact match ↑ | perplexity ↓ |" + (" judge lose-rate ↓ | single ↑ | MT-Bench ROUGE-L ↑ |" if j else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if j else "")]

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    for label, r in report["models"].items():
        row = (f"| {label} | {pct(r.get('flip_rate'))} | {_num(r.get('rouge_l'), '.3f')} | {pct(r.get('exact_match'))} | "
               f"{_num(r.get('perplexity'), '.2f')} |")
        if j:
            row += (f" {pct(r.get('judge_lose_rate'))} ({pct(r.get('judge_lose_rate_fastchat'))}) |" if label != j["baseline"]
                    else " baseline |") + f" {_num(r.get('judge_single'), '.2f')} |"
            row += " 1.000 |" if label == j["baseline"] else f" {_num(r.get('mtbench_rouge_l'), '.3f')} |"
        lines.append(row)
    if j and j.get("stopped"):
        lines += ["", f"The judge gave no verdict or rating in its first {j['stopped']['probe']} replies, so the other "
                  f"{j['stopped']['not_asked']} calls were not made (see judge/judge.md)."]
    if report.get("differences"):
        lines += ["", f"Differences over the same {report['n_prompts']} prompts, with 95 % intervals (paired bootstrap; "
                  "an interval holding 0 is no evidence of a difference):", "",
                  *differences_table(report["differences"])]
    return "\n".join(lines) + "\n"


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _write_samples(path: Path, rows, samples: dict[str, list[str]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps({"id": r["id"], "prompt": r["prompt"],
                                    **{k: v[i] for k, v in samples.items()}}) + "\n")


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["models"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ["flip_rate", "rouge_l", "exact_match"],
                              ["flip rate (lower is better)", "ROUGE-L to fp", "exact match with fp"]):
        ax.bar(labels, [report["models"][k][key] for k in labels], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
