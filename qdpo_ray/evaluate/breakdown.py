"""Breakdown analysis (paper §3.2, appendix A.2, Fig. 2): why does a quantized model's answer drift?

For each prompt the fp model and a quantized model π_q decode greedily in lock step until their first
different token, at answer index d. At that moment three things differ between the two runs:

  token   the token at d: fp's choice, or π_q's flipped one (the paper's T_F)
  kv      the KV cache of the prompt and the common prefix (positions < d): computed by fp or by π_q
          (KV_Perturb) — the real DynamicCache each model built while decoding, copied
  model   the model that continues from d + 1 on: fp or π_q (Q_Error)

The 2 × 2 × 2 combinations are the paper's eight cases. Each case appends its token at d to (a copy of)
its cache and lets its model continue greedily for up to `max_new_tokens` tokens; the continuation (the
tokens from d on) is scored with ROUGE-1/2/L F1 against fp's own answer from d on. Case 8 (all fp) is fp's
own answer, so it scores 1.0; case 1 (all π_q) is π_q's own answer. With `breakdown.verify` both are
checked token for token against a separate `generate` decode.

Case numbers follow the paper's text: case 1 has all three factors, case 8 none, cases 1–4 carry the
flipped token and case 4 is the flipped token alone. Inside each half the KV factor is the slower bit:

    case  token  kv   model         case  token  kv   model
    1     q      q    q             5     fp     q    q
    2     q      q    fp            6     fp     q    fp      (KV cache alone)
    3     q      fp   q             7     fp     fp   q       (quantization error alone)
    4     q      fp   fp  (T_F)     8     fp     fp   fp      (the fp model)

A factor's effect is the 2³-factorial main effect: mean ROUGE of the four cases where that factor comes
from fp minus the mean of the four where it comes from π_q. Prompts whose answers never differ within
`max_new_tokens` tokens have no flipped token; they are counted and left out of the means.

Outputs in `out/`: README.md and results.json for all models, and per quantized model `out/<label>/`:
samples.jsonl (one prompt per line, every case's text and scores), scores.parquet (one row per prompt
and case), results.json, README.md, breakdown.png (Fig. 2b) and sorted.png (Fig. 2c–d).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qdpo_ray.config import ConfigError, RunConfig, dump_config
from qdpo_ray.data import format_prompt, load_prompts
from qdpo_ray.generate.hf import _eos_ids, greedy_generate
from qdpo_ray.io import atomic_path, atomic_write_json, atomic_write_text
from qdpo_ray.models import load_model, load_tokenizer
from qdpo_ray.quant.fake_quant import quantize_model_rtn
from qdpo_ray.text_metrics import ROUGE, rouge_scores

log = logging.getLogger(__name__)

METRICS = ROUGE
METRIC_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
FACTORS = ("token", "kv", "model")
FACTOR_NAMES = {"token": "flipped token (T_F)", "kv": "KV cache (KV_Perturb)",
                "model": "continuing model (Q_Error)"}


@dataclass(frozen=True)
class Case:
    number: int
    token: str  # "q" or "fp": whose token sits at d
    kv: str     # whose KV cache covers the positions < d
    model: str  # who continues

    @property
    def factors(self) -> list[str]:
        """The factors present (taken from π_q) in this case."""
        return [f for f in FACTORS if getattr(self, f) == "q"]

    @property
    def short(self) -> str:
        marks = {"token": "T", "kv": "KV", "model": "Q"}
        return "+".join(marks[f] for f in self.factors) or "none"


CASES: tuple[Case, ...] = tuple(
    Case(1 + 4 * ti + 2 * ki + mi, t, k, m)
    for ti, t in enumerate(("q", "fp")) for ki, k in enumerate(("q", "fp")) for mi, m in enumerate(("q", "fp"))
)
ALONE = {"token": 4, "kv": 6, "model": 7}  # the case where only this factor comes from π_q


# --------------------------------------------------------------------------------------------------
# Decoding with explicit caches


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First index where two token sequences differ; None when one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


@torch.no_grad()
def forward_step(model, ids: list[int], cache) -> torch.Tensor:
    """Feed `ids` after what `cache` holds (the cache grows in place); the next-token logits."""
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), past_key_values=cache, use_cache=True)
    return out.logits[0, -1].float()


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


@dataclass
class Divergence:
    """Where two greedy runs first part: the common prefix, each model's token there, each model's cache."""

    d: int | None                 # answer index of the first different token; None: none within the window
    prefix: list[int]             # the common answer tokens before d
    token: dict[str, int] = field(default_factory=dict)  # {"fp": id, "q": id} at d
    cache: dict[str, Any] = field(default_factory=dict)  # {"fp": cache, "q": cache}: prompt + prefix


@torch.no_grad()
def find_divergence(models: dict[str, Any], prompt_ids: list[int], window: int, eos: set[int]) -> Divergence:
    """Decode both models greedily in lock step (prefill the prompt, then one token at a time) until their
    argmax differs. The caches returned are the ones each model built on its own decode, holding the KV of
    the prompt and the common prefix: exactly what the model had computed when it chose its token at d."""
    caches = {k: new_cache() for k in models}
    logits = {k: forward_step(m, prompt_ids, caches[k]) for k, m in models.items()}
    prefix: list[int] = []
    for t in range(window):
        top = {k: int(v.argmax()) for k, v in logits.items()}
        if top["fp"] != top["q"]:
            return Divergence(t, prefix, top, caches)
        prefix.append(top["fp"])
        if top["fp"] in eos or t == window - 1:
            break
        logits = {k: forward_step(m, [top[k]], caches[k]) for k, m in models.items()}
    return Divergence(None, prefix)


@torch.no_grad()
def continue_greedy(model, cache, first: int, n: int, eos: set[int]) -> list[int]:
    """`first`, then the model's greedy tokens after it (cache + first + ...), up to n tokens or EOS."""
    toks = [first]
    while len(toks) < n and toks[-1] not in eos:
        toks.append(int(forward_step(model, [toks[-1]], cache).argmax()))
    return toks


def case_cache(div: Divergence, case: Case):
    """The cache a case starts from: a copy of the named model's cache (the original stays untouched)."""
    return copy.deepcopy(div.cache[case.kv])


def run_case(models: dict[str, Any], div: Divergence, case: Case, n: int, eos: set[int]) -> list[int]:
    """The case's continuation: its token at d, then its model's greedy tokens on its cache."""
    return continue_greedy(models[case.model], case_cache(div, case), div.token[case.token], n, eos)


# --------------------------------------------------------------------------------------------------
# Scores and summary (pure)



def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _se(xs: list[float]) -> float | None:
    """Standard error of the mean (None below two values)."""
    if len(xs) < 2:
        return None
    mu = sum(xs) / len(xs)
    return float((sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5)


def _sample_effect(s: dict[str, Any], f: str, m: str) -> float:
    """One sample's main effect of factor f: its fp-side cases' mean minus its π_q-side cases' mean."""
    return sum((1 if getattr(c, f) == "fp" else -1) * s["cases"][str(c.number)][m] for c in CASES) / 4


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-case means, factor effects and the conclusion from per-sample records (pure).

    Each sample has `d` (None: no divergence) and `cases` {"1".."8": {rouge1, rouge2, rougeL, ...}}."""
    div = [s for s in samples if s["d"] is not None]
    out: dict[str, Any] = {
        "n_prompts": len(samples), "n_diverged": len(div), "n_identical": len(samples) - len(div),
        "mean_first_divergence": _mean([float(s["d"]) for s in div]),
        "cases": {}, "effects": {}, "effects_se": {}, "alone": {},
    }
    for c in CASES:
        rows = [s["cases"][str(c.number)] for s in div]
        out["cases"][str(c.number)] = {
            "token": c.token, "kv": c.kv, "model": c.model, "factors": c.factors,
            **{m: _mean([r[m] for r in rows]) for m in METRICS},
            "mean_tokens": _mean([float(len(r["token_ids"])) for r in rows if "token_ids" in r]),
        }
    if not div:
        out["dominant"] = None
        out["conclusion"] = "No prompt diverged within the window: nothing to break down."
        return out
    case = out["cases"]
    for f in FACTORS:
        fp_side = [c for c in CASES if getattr(c, f) == "fp"]
        q_side = [c for c in CASES if getattr(c, f) == "q"]
        out["effects"][f] = {m: sum(case[str(c.number)][m] for c in fp_side) / 4
                             - sum(case[str(c.number)][m] for c in q_side) / 4 for m in METRICS}
        out["effects_se"][f] = {m: _se([_sample_effect(s, f, m) for s in div]) for m in METRICS}
        out["alone"][f] = {m: case["8"][m] - case[str(ALONE[f])][m] for m in METRICS}
    order = {m: sorted(FACTORS, key=lambda f: -out["effects"][f][m]) for m in METRICS}
    dom = order["rougeL"][0]
    alone_dom = max(FACTORS, key=lambda f: out["alone"][f]["rougeL"])
    out.update(order=order, dominant=dom, dominant_alone=alone_dom)
    eff, alone = out["effects"], out["alone"]
    agree = all(order[m][0] == dom for m in METRICS)
    holds = [dom == "token", alone_dom == "token"]
    out["paper_finding_holds"] = all(holds)
    text = (f"The {FACTOR_NAMES[dom]} moves ROUGE-L most: main effect {eff[dom]['rougeL']:.3f}, against "
            + " and ".join(f"{eff[f]['rougeL']:.3f} for the {FACTOR_NAMES[f]}" for f in FACTORS if f != dom)
            + ("; ROUGE-1 and ROUGE-2 rank it first too. " if agree else "; "
               + ", ".join(f"{METRIC_NAMES[m]} ranks the {FACTOR_NAMES[order[m][0]]} first" for m in METRICS[:2])
               + ". ")
            + f"Alone against case 8, ROUGE-L drops by {alone['token']['rougeL']:.3f} (token, case 4), "
            f"{alone['kv']['rougeL']:.3f} (KV cache, case 6) and {alone['model']['rougeL']:.3f} "
            f"(continuing model, case 7). "
            + "The paper's finding (the flipped token dominates) ")
    if all(holds):
        text += "holds."
    elif any(holds):
        ranked, other = ("main effects", "single-factor cases") if holds[0] else ("single-factor cases", "main effects")
        text += (f"holds only in part: the {ranked} rank the token first, the {other} the "
                 f"{FACTOR_NAMES[alone_dom if holds[0] else dom]}.")
    else:
        text += "does not hold here."
    # Is the lead of the first factor over the second resolved by this many prompts? (paired over samples)
    second = order["rougeL"][1]
    lead = [_sample_effect(s, dom, "rougeL") - _sample_effect(s, second, "rougeL") for s in div]
    se = _se(lead)
    out["lead_over_second"] = {"factor": second, "mean": _mean(lead), "se": se}
    if se is None or (_mean(lead) or 0.0) < 2 * se:
        text += (f" With {len(div)} diverged prompts the lead over the {FACTOR_NAMES[second]} "
                 f"({_mean(lead):.3f}" + (f" ± {se:.3f} SE" if se is not None else "") + ") is within two "
                 "standard errors: not resolved.")
    out["conclusion"] = text
    return out


# --------------------------------------------------------------------------------------------------
# One quantized model


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def analyse_prompt(models: dict[str, Any], tok, prompt_ids: list[int], n: int, eos: set[int],
                   fp_full_fn=None, q_full_fn=None) -> dict[str, Any]:
    """The eight cases of one prompt. With `fp_full_fn(length)` (fp's own `generate` answer of that many
    tokens) the reference is that answer from d on and case 8 is checked against it; `q_full_fn(length)`
    is π_q's own answer, for the check of case 1. Without them the reference is case 8."""
    div = find_divergence(models, prompt_ids, n, eos)
    rec: dict[str, Any] = {"d": div.d, "prefix_token_ids": div.prefix, "prefix": _decode(tok, div.prefix)}
    if div.d is None:
        return rec
    conts = {c.number: run_case(models, div, c, n, eos) for c in CASES}
    ref = conts[8]
    checks: dict[str, Any] = {}
    fp_full = fp_full_fn(div.d + n) if fp_full_fn is not None else None
    if fp_full is not None:
        ref = fp_full[div.d:div.d + n]
        checks["fp_prefix_matches"] = fp_full[:div.d] == div.prefix
        checks["fp_reproduced"] = conts[8] == ref
    if q_full_fn is not None:
        q_full = q_full_fn(div.d + n)
        checks["q_prefix_matches"] = q_full[:div.d] == div.prefix
        checks["q_reproduced"] = conts[1] == q_full[div.d:div.d + n]
        if fp_full is not None:
            checks["d_matches_generate"] = first_divergence(fp_full, q_full) == div.d
    ref_text = _decode(tok, ref)
    rec.update({
        "fp_token_id": div.token["fp"], "q_token_id": div.token["q"],
        "fp_token": tok.decode([div.token["fp"]]), "q_token": tok.decode([div.token["q"]]),
        "reference_token_ids": ref, "reference": ref_text,
        "cases": {},
    })
    for c in CASES:
        text = _decode(tok, conts[c.number])
        rec["cases"][str(c.number)] = {"token_ids": conts[c.number], "text": text, **rouge_scores(text, ref_text)}
    if checks:
        rec["checks"] = checks
    return rec


def _quantized_models(cfg: RunConfig, fp) -> list[tuple[str, str, Any]]:
    """(label, spec, model-or-loader) for every quantized model the config names."""
    specs: list[tuple[str, str]] = []
    if cfg.breakdown.rtn and cfg.quant.enabled:
        specs.append(("rtn", "rtn"))
    used = {s[0] for s in specs}
    for ck in cfg.breakdown.checkpoints:
        base = Path(ck.rstrip("/")).name or "checkpoint"
        label, i = base, 2
        while label in used:
            label, i = f"{base}-{i}", i + 1
        used.add(label)
        specs.append((label, ck))
    if not specs:
        raise ConfigError("breakdown: no quantized model to analyse; set quant.bits below 16 (RTN) or give "
                          "--checkpoint DIR (breakdown.checkpoints)")
    return specs


def _load_quantized(spec: str, fp, cfg: RunConfig):
    if spec == "rtn":
        return quantize_model_rtn(copy.deepcopy(fp), cfg.quant)
    return load_model(spec, dtype="float32")


def _write_model_outputs(out: Path, label: str, summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "samples.jsonl") as tmp:
        with open(tmp, "w") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
    rows = []
    for s in samples:
        if s["d"] is None:
            continue
        for c in CASES:
            r = s["cases"][str(c.number)]
            rows.append({"id": s["id"], "model": label, "d": s["d"], "case": c.number, "token": c.token,
                         "kv": c.kv, "continues": c.model, **{m: r[m] for m in METRICS},
                         "n_tokens": len(r["token_ids"]), "text": r["text"], "reference": s["reference"]})
    schema = pa.schema([("id", pa.string()), ("model", pa.string()), ("d", pa.int64()), ("case", pa.int64()),
                        ("token", pa.string()), ("kv", pa.string()), ("continues", pa.string()),
                        *[(m, pa.float64()) for m in METRICS], ("n_tokens", pa.int64()), ("text", pa.string()),
                        ("reference", pa.string())])
    with atomic_path(out / "scores.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "README.md", f"# Breakdown analysis: {label}\n\n" + model_table(label, summary)
                      + "\n![Fig. 2(b)](breakdown.png)\n\n![Fig. 2(c-d)](sorted.png)\n")
    if summary["n_diverged"]:
        plot_bars(summary, out / "breakdown.png", label)
        plot_sorted(samples, out / "sorted.png", label)


def run_breakdown(cfg: RunConfig) -> dict[str, Any]:
    """Run the breakdown analysis for every quantized model of `cfg` and write `cfg.out`."""
    bc = cfg.breakdown
    t0 = time.time()
    out = Path(cfg.out)
    prompts = load_prompts(cfg.prompts)
    tok = load_tokenizer(cfg.model)
    fp = load_model(cfg.model, dtype="float32")
    specs = _quantized_models(cfg, fp)
    out.mkdir(parents=True, exist_ok=True)
    eos = _eos_ids(fp, tok)
    ids = [format_prompt(tok, p, cfg.model) for p in prompts.prompts]
    n = bc.max_new_tokens
    fp_answers: dict[int, list[int]] = {}  # prompt index → fp's own answer, the longest asked so far

    def fp_full(i: int, length: int) -> list[int]:
        # a greedy answer of fewer tokens is a prefix of a longer one: decode again only to lengthen it
        if i not in fp_answers or (len(fp_answers[i]) < length and fp_answers[i][-1] not in eos):
            fp_answers[i] = greedy_generate(fp, tok, [ids[i]], length, batch_size=1)[0]
        return fp_answers[i][:length]

    report: dict[str, Any] = {
        "model": cfg.model.name, "prompts": cfg.prompts.source, "n_prompts": len(ids), "max_new_tokens": n,
        "cases": [{"case": c.number, "token": c.token, "kv": c.kv, "model": c.model, "factors": c.factors}
                  for c in CASES],
        "models": {},
    }
    for label, spec in specs:
        tm = time.time()
        q = _load_quantized(spec, fp, cfg)
        models = {"fp": fp, "q": q}
        samples = []
        for i, (row, p) in enumerate(zip(prompts.rows, ids)):
            ffn = (lambda length, i=i: fp_full(i, length)) if bc.verify else None
            qfn = (lambda length, p=p: greedy_generate(q, tok, [p], length, batch_size=1)[0]) if bc.verify else None
            rec = analyse_prompt(models, tok, p, n, eos, ffn, qfn)
            samples.append({"id": row["id"], "prompt": row["prompt"], "model": label, **rec})
            log.info("%s %d/%d %s: d=%s", label, i + 1, len(ids), row["id"], rec["d"])
        summary = summarize(samples)
        summary.update({"label": label, "quantized": spec if spec != "rtn" else f"RTN {cfg.quant.label}",
                        "checks": _checks(samples), "wall_s": round(time.time() - tm, 1)})
        _write_model_outputs(out / label, label, summary, samples)
        report["models"][label] = summary
        del q, models
    report["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "README.md", "# Breakdown analysis (paper §3.2, Fig. 2)\n\n" + breakdown_table(report))
    dump_config(cfg, out / "config.yaml")
    return report


def _checks(samples: list[dict[str, Any]]) -> dict[str, Any]:
    keys = sorted({k for s in samples for k in s.get("checks", {})})
    return {k: {"passed": sum(bool(s["checks"][k]) for s in samples if k in s.get("checks", {})),
                "of": sum(k in s.get("checks", {}) for s in samples)} for k in keys}


# --------------------------------------------------------------------------------------------------
# Tables and figures


_SRC = {"q": "π_q", "fp": "fp"}


def model_table(label: str, s: dict[str, Any]) -> str:
    md = s["mean_first_divergence"]
    lines = [f"**{label}** ({s.get('quantized', label)}): {s['n_diverged']} of {s['n_prompts']} prompts diverge"
             + (f", mean first divergence at token {md:.1f}" if md is not None else "") + ".", ""]
    if not s["n_diverged"]:
        return "\n".join(lines + [s["conclusion"], ""])
    lines += ["| case | token at d | KV cache < d | continues | factors | ROUGE-1 | ROUGE-2 | ROUGE-L | tokens |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in CASES:
        r = s["cases"][str(c.number)]
        tok = "π_q (flipped)" if c.token == "q" else "fp"
        lines.append(f"| {c.number} | {tok} | {_SRC[c.kv]} | {_SRC[c.model]} | {c.short} | {r['rouge1']:.3f} | "
                     f"{r['rouge2']:.3f} | {r['rougeL']:.3f} | {r['mean_tokens']:.1f} |")
    lines += ["", "| factor | main effect ROUGE-1 (± SE) | ROUGE-2 | ROUGE-L | alone (case 8 − case k), ROUGE-L |",
              "|---|---|---|---|---|"]
    for f in FACTORS:
        e, a, se = s["effects"][f], s["alone"][f], s["effects_se"][f]
        cell = {m: f"{e[m]:.3f}" + (f" ± {se[m]:.3f}" if se[m] is not None else "") for m in METRICS}
        lines.append(f"| {FACTOR_NAMES[f]} | {cell['rouge1']} | {cell['rouge2']} | {cell['rougeL']} | "
                     f"{a['rougeL']:.3f} (case {ALONE[f]}) |")
    chk = s.get("checks") or {}
    if chk:
        lines += ["", "Checks: " + ", ".join(f"{k} {v['passed']}/{v['of']}" for k, v in chk.items()) + "."]
    lines += ["", f"**Conclusion:** {s['conclusion']}", ""]
    return "\n".join(lines)


def breakdown_table(report: dict[str, Any]) -> str:
    head = (f"fp model `{report['model']}`, prompts `{report['prompts']}` ({report['n_prompts']}), first divergence "
            f"searched in {report['max_new_tokens']} greedy tokens, each case continues up to "
            f"{report['max_new_tokens']} tokens from it; scores are F1 against fp's own answer from d on.\n\n")
    return head + "\n".join(model_table(label, s) for label, s in report["models"].items())


_XPOS = [0, 1, 2, 3, 4.7, 5.7, 6.7, 7.7]  # two groups: with / without the flipped token


def _case_colors() -> dict[int, Any]:
    from matplotlib import colormaps

    reds, blues = colormaps["Reds"], colormaps["Blues"]
    return {c.number: (reds if c.token == "q" else blues)(0.9 - 0.15 * ((c.number - 1) % 4)) for c in CASES}


def plot_bars(s: dict[str, Any], path: Path, label: str) -> None:
    """Fig. 2(b): mean ROUGE per case, the four flipped-token cases next to the four fp-token cases."""
    from qdpo_ray.plots import pyplot, save_figure

    plt = pyplot()
    colors = _case_colors()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    ticks = [f"{c.number}\n{c.short}" for c in CASES]
    for ax, m in zip(axes, METRICS):
        vals = [s["cases"][str(c.number)][m] for c in CASES]
        bars = ax.bar(_XPOS, vals, color=[colors[c.number] for c in CASES], edgecolor="black", linewidth=0.5)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(_XPOS, ticks, fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.set_title(METRIC_NAMES[m])
        ax.axvline(3.85, color="grey", lw=0.8, ls=":")
        ax.text(1.5, 1.08, "token at d: π_q (flipped)", ha="center", fontsize=8)
        ax.text(6.2, 1.08, "token at d: fp", ha="center", fontsize=8)
    axes[0].set_ylabel("mean F1 vs fp answer from d")
    fig.suptitle(f"Breakdown ({label}, {s['n_diverged']} diverged prompts): T = π_q's token at d, "
                 "KV = π_q's cache before d, Q = π_q continues", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_sorted(samples: list[dict[str, Any]], path: Path, label: str) -> None:
    """Fig. 2(c–d): each case's per-sample scores, sorted from best to worst."""
    from qdpo_ray.plots import pyplot, save_figure

    plt = pyplot()
    colors = _case_colors()
    div = [s for s in samples if s["d"] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True)
    for ax, m in zip(axes, METRICS):
        for c in CASES:
            ys = sorted((s["cases"][str(c.number)][m] for s in div), reverse=True)
            xs = [(i + 0.5) / len(ys) for i in range(len(ys))]
            ax.plot(xs, ys, color=colors[c.number], lw=1.6, ls="-" if c.token == "q" else "--",
                    marker="o", ms=2.5, label=f"case {c.number} ({c.short})")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("samples, sorted by score (share)")
        ax.set_title(METRIC_NAMES[m])
    axes[0].set_ylabel("F1 vs fp answer from d")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=8, frameon=False)
    fig.suptitle(f"Per-sample scores by case ({label}, {len(div)} diverged prompts); solid = flipped token",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path)
