"""The report of one pipeline run: README.md + PNGs + results.json, built from the stages' own outputs.

Reads flips' summary.json, pairs' summary.json, train's summary.json + metrics.csv, evaluate's
results.json and their plots, from the output directories the pipeline passes in; computes nothing new
except the comparison-table image. A stage the run did not select is left out of the report.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from qdpo_ray.config import RunConfig
from qdpo_ray.io import atomic_dir

# report file → (stage, file in that stage's output directory)
FIGURES = {"margins.png": ("flips", "margins.png"), "training.png": ("train", "training.png"),
           "comparison.png": ("evaluate", "comparison.png")}


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def collect(cfg: RunConfig, sources: dict[str, Path], timings: dict[str, float | None],
            serve: str | None) -> dict[str, Any]:
    """The numbers of the report, from the output directories in `sources` (stage name → directory)."""
    def _read(stage: str, name: str) -> dict[str, Any] | None:
        return _json(Path(sources[stage]) / name) if stage in sources else None

    res: dict[str, Any] = {"model": cfg.model.name, "quant": cfg.quant.label,
                           "train_prompts": cfg.pipeline.train_prompts.model_dump(mode="json"),
                           "eval_prompts": cfg.pipeline.eval_prompts.model_dump(mode="json"),
                           "stage_wall_s": timings,
                           "total_stage_wall_s": round(sum(v for v in timings.values() if v), 1),
                           "serve_command": serve}
    if (f := _read("flips", "summary.json")) is not None:
        res["flips"] = {k: f.get(k) for k in ("n_prompts", "n_tokens", "n_flips", "flip_rate", "prompts_with_flip",
                                               "mean_first_flip_position", "mean_margin_flipped",
                                               "mean_margin_unflipped", "max_new_tokens")}
    if (p := _read("pairs", "summary.json")) is not None:
        res["pairs"] = {k: p.get(k) for k in ("prompts", "pairs_generated", "pairs_kept", "removed", "identical_rate",
                                               "mean_first_divergence", "generated_tokens", "max_new_tokens",
                                               "wall_s")}
    if (t := _read("train", "summary.json")) is not None:
        hist = _metrics(Path(sources["train"]) / "metrics.csv")
        res["train"] = {"objective": t.get("objective"), "steps": t.get("steps"), "pairs": t.get("pairs"),
                        "export": t.get("export"), "first": hist[0] if hist else None,
                        "final": t.get("final"), "wall_s": t.get("wall_s")}
    if (e := _read("evaluate", "results.json")) is not None:
        res["evaluate"] = e
    return res


def _metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def markdown(res: dict[str, Any], figures: list[str]) -> str:
    L = [f"# QDPO run report — {res['model']}, {res['quant']}", ""]
    tp, ep = res["train_prompts"], res["eval_prompts"]
    L += [f"Training prompts: `{tp['source']}`{' (first ' + str(tp['limit']) + ')' if tp['limit'] else ''}; "
          f"held-out prompts: `{ep['source']}`{' (first ' + str(ep['limit']) + ')' if ep['limit'] else ''}. "
          "Every number below is read from the stage outputs of this run directory (`../`); "
          "`results.json` holds them all.", ""]
    if "evaluate" in res:
        from qdpo_ray.evaluate.compare import gap_sentence, results_table

        L += ["## Held-out comparison (fp vs RTN vs trained)", "", results_table(res["evaluate"]).rstrip(), ""]
        if gap_sentence(res["evaluate"]):
            L += [gap_sentence(res["evaluate"]), ""]
        L += ["flip rate: share of the fp greedy answer's tokens where the model's argmax differs (teacher "
              "forced); ROUGE-L and exact match: the model's own greedy answer against the fp answer; "
              "perplexity: on held-out reference texts. All models in fp32 through transformers.", ""]
        for fig in ("comparison_table.png", "comparison.png"):
            if fig in figures:
                L += [f"![{fig}]({fig})", ""]
    if "flips" in res:
        f = res["flips"]
        L += ["## Token flips of RTN (paper §3.1)", "",
              f"{f['n_prompts']} held-out prompts, fp greedy answers of up to {f['max_new_tokens']} tokens "
              f"teacher-forced through the RTN model: **{_pct(f['flip_rate'])}** of tokens flip "
              f"({f['n_flips']}/{f['n_tokens']}); {f['prompts_with_flip']}/{f['n_prompts']} answers have a flip, "
              f"the first at token {_num(f['mean_first_flip_position'], '.1f')} on average. Mean fp top-1 − top-2 "
              f"probability margin: {_num(f['mean_margin_flipped'])} at flipped tokens vs "
              f"{_num(f['mean_margin_unflipped'])} elsewhere — flips happen where the fp model was nearly undecided.",
              ""]
        if "margins.png" in figures:
            L += ["![flip margins](margins.png)", ""]
    if "pairs" in res:
        p = res["pairs"]
        L += ["## Preference pairs (fp answer ≻ W4 answer)", "",
              f"{p['pairs_generated']} pairs from {p['prompts']} prompts ({p['max_new_tokens']} greedy tokens per "
              f"answer, vLLM), {p['pairs_kept']} kept (removed: "
              + ", ".join(f"{k} {v}" for k, v in (p.get("removed") or {}).items()) + "); identical answers "
              f"{_pct(p['identical_rate'])}, mean first divergence at token {_num(p['mean_first_divergence'], '.1f')}.",
              ""]
    if "train" in res:
        t = res["train"]
        first, fin = t.get("first") or {}, t.get("final") or {}
        L += [f"## Training ({(t['objective'] or '').upper()}, STE fake-quant, Ray Train + DeepSpeed)", "",
              f"{t['steps']} optimizer steps on {t['pairs']} pairs in {_num(t['wall_s'], '.0f')} s.", "",
              "| step | loss | reward chosen | reward rejected | margin | accuracy |", "|---|---|---|---|---|---|"]
        for m in (first, fin):
            if m:
                L.append(f"| {int(m.get('step', 0))} | {_num(m.get('loss'), '.4f')} | {_num(m.get('rewards/chosen'))} | "
                         f"{_num(m.get('rewards/rejected'))} | {_num(m.get('rewards/margins'))} | "
                         f"{_num(m.get('rewards/accuracies'), '.2f')} |")
        L += ["", f"Trained W4 checkpoint: `{t['export']}`.", ""]
        if "training.png" in figures:
            L += ["![training curves](training.png)", ""]
    L += ["## Stage wall times (the run that produced each output)", "", "| stage | wall |", "|---|---|"]
    L += [f"| {k} | {_num(v, '.0f')} s |" for k, v in res["stage_wall_s"].items()]
    L += [f"| total | {_num(res['total_stage_wall_s'], '.0f')} s |", ""]
    if res.get("serve_command"):
        L += ["## Serve it", "", "```bash", res["serve_command"], "```", ""]
    return "\n".join(L)


def table_png(report: dict[str, Any], path: Path) -> None:
    """The held-out comparison table as an image (for slides and issue comments)."""
    from qdpo_ray.plots import pyplot, save_figure

    plt = pyplot()

    cols = ["model", "flip rate ↓", "ROUGE-L to fp ↑", "exact match ↑", "perplexity ↓"]
    rows = [[label, f"{r['flip_rate']:.1%}", f"{r['rouge_l']:.3f}", f"{r['exact_match']:.1%}", f"{r['perplexity']:.2f}"]
            for label, r in report["models"].items()]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.42 * (len(rows) + 1)))
    ax.axis("off")
    tbl = ax.table(cellText=rows, colLabels=cols, loc="center", cellLoc="center")
    tbl.scale(1, 1.4)
    ax.set_title(f"{report['quant']} on {report['n_prompts']} held-out prompts ({report['prompts']})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(cfg: RunConfig, out: Path, sources: dict[str, Path], timings: dict[str, float | None],
                 serve: str | None) -> dict[str, Any]:
    """Write the report of the stages in `sources` (stage name → output directory) into `out`."""
    res = collect(cfg, sources, timings, serve)
    with atomic_dir(out) as tmp:
        figures = []
        for name, (stage, src) in FIGURES.items():
            if stage in sources and (Path(sources[stage]) / src).is_file():
                shutil.copyfile(Path(sources[stage]) / src, tmp / name)
                figures.append(name)
        if "evaluate" in res:
            table_png(res["evaluate"], tmp / "comparison_table.png")
            figures.append("comparison_table.png")
        (tmp / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        (tmp / "README.md").write_text(markdown(res, figures))
    return res
