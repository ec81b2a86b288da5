"""`qdpo-ray pipeline`: plan the stages of one run directory, skip those already done, run the rest.

    quantize ─► pairs ─► train (+ W4 export) ─► evaluate ─► report
    flips ─────────────────────────────────────────────────┘

Run directory (`out`): config.yaml (the resolved config), w4-rtn/, flips/, pairs/, train/ (holding the
trained W4 export), eval/, report/, and one marker per stage, `.stage-<name>.json`.

A stage's hash is the sha256 of the JSON of the config fields it reads plus its upstream stages' hashes,
so changing `train.lr` re-runs train, evaluate and report but not quantize, flips or pairs. The marker is
written atomically: `running` just before the stage starts, `done` only after it returned. On a re-run:

    done, same hash, output present     skipped
    running, same hash                  resumed: pairs and training continue from their own part files
                                        and checkpoints, the other stages start over
    another hash / output but no marker output removed, stage re-run
    no output, no marker                run

and every stage downstream of one that runs runs too. The stage functions themselves are the ones the
single-stage commands call (`run_quantize`, `run_flips`, `run_pairs`, `run_train`, `run_evaluate`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qdpo_ray.config import PIPELINE_STAGES, ConfigError, PipelineConfig, PromptsConfig, RunConfig, TrainConfig

# Bump when a stage's outputs change meaning for the same config (invalidates every marker).
PIPELINE_VERSION = 1

DEPS: dict[str, tuple[str, ...]] = {
    "quantize": (), "flips": (), "pairs": ("quantize",), "train": ("pairs",),
    "evaluate": ("quantize", "train"), "report": ("flips", "pairs", "train", "evaluate"),
}
DIRS = {"quantize": "w4-rtn", "flips": "flips", "pairs": "pairs", "train": "train", "evaluate": "eval",
        "report": "report"}
# A file each stage writes last; a done marker without it means the output was deleted.
PRODUCT = {"quantize": "config.json", "flips": "summary.json", "pairs": "summary.json",
           "train": "summary.json", "evaluate": "results.json", "report": "README.md"}
RESUMABLE = {"pairs", "train"}


@dataclass
class Stage:
    name: str
    out: Path
    hash: str
    deps: tuple[str, ...]
    inputs: dict[str, Any]  # what the hash covers; kept in the marker to explain a later re-run
    cfg: RunConfig  # the config handed to the stage function
    status: str = "run"  # skip | resume | run | rerun
    reason: str = ""
    wall_s: float | None = None

    @property
    def marker(self) -> Path:
        return self.out.parent / f".stage-{self.name}.json"

    def row(self) -> dict[str, Any]:
        return {"stage": self.name, "status": self.status, "reason": self.reason, "out": str(self.out),
                "hash": self.hash[:12], "wall_s": self.wall_s}


# --------------------------------------------------------------------------------------------------
# Planning (pure: reads markers, never loads a model or starts Ray)


def check(cfg: RunConfig) -> None:
    """Refuse settings the pipeline would silently override; each message names the field and the fix."""
    from qdpo_ray.quant.export import PACKABLE_BITS

    if cfg.quant.bits not in PACKABLE_BITS:
        raise ConfigError(f"quant.bits={cfg.quant.bits}: the pipeline exports and serves a packed checkpoint, "
                          f"which supports {PACKABLE_BITS}; use `qdpo-ray flips` to study other bit widths")
    if not cfg.train.export:
        raise ConfigError("train.export=false: the pipeline evaluates and serves the trained W4 export; "
                          "remove the override")
    if cfg.prompts != PromptsConfig():
        raise ConfigError("prompts: the pipeline reads pipeline.train_prompts (pairs, training) and "
                          "pipeline.eval_prompts (flips, evaluation); set those instead of prompts.*")
    if cfg.pairs.w4_dir is not None:
        raise ConfigError("pairs.w4_dir: the pipeline quantizes into <out>/w4-rtn itself; remove the override "
                          "(or run `qdpo-ray generate-pairs --w4 DIR` on its own)")
    if cfg.train.pairs != TrainConfig.model_fields["pairs"].default:
        raise ConfigError("train.pairs: the pipeline trains on its own <out>/pairs; remove the override "
                          "(or run `qdpo-ray train --pairs DIR` on its own)")


def selected(stages: list[str]) -> list[str]:
    """The requested stages plus everything they need, in pipeline order."""
    want: set[str] = set()
    todo = list(stages)
    while todo:
        s = todo.pop()
        if s not in want:
            want.add(s)
            if s != "report":  # the report covers whatever was selected; it pulls nothing in
                todo.extend(DEPS[s])
    return [s for s in PIPELINE_STAGES if s in want]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _derive(cfg: RunConfig, out: Path, prompts: PromptsConfig | None = None, **sections: dict) -> RunConfig:
    # The pipeline section is reset so a stage's own config (and e.g. Ray Train's run name, a hash of
    # it) does not change with which stages were selected.
    data = cfg.model_dump(mode="json")
    data.update(out=str(out), pipeline=PipelineConfig().model_dump(mode="json"))
    if prompts is not None:
        data["prompts"] = PromptsConfig(**prompts.model_dump()).model_dump(mode="json")
    for name, updates in sections.items():
        data[name] = {**data[name], **updates}
    return RunConfig.model_validate(data)


def _inputs(cfg: RunConfig, name: str) -> dict[str, Any]:
    """The config fields stage `name` reads (paths the pipeline sets itself are covered by upstream hashes)."""
    d = cfg.model_dump(mode="json")
    model, quant = d["model"], d["quant"]
    train_p = d["pipeline"]["train_prompts"]
    eval_p = d["pipeline"]["eval_prompts"]
    if name == "quantize":
        return {"model": model, "quant": quant}
    if name == "flips":
        return {"model": model, "quant": quant, "prompts": eval_p, "flips": d["flips"]}
    if name == "pairs":
        pairs = {k: v for k, v in d["pairs"].items() if k not in ("w4_dir", "overwrite")}
        return {"model": model, "prompts": train_p, "pairs": pairs, "seed": d["seed"]}
    if name == "train":
        train = {k: v for k, v in d["train"].items() if k != "pairs"}
        return {"model": model, "quant": quant, "train": train, "seed": d["seed"]}
    if name == "evaluate":
        extra = {k: v for k, v in d["evaluate"]["models"].items() if k != "rtn"}
        return {"model": model, "quant": quant, "prompts": eval_p, "flips": d["flips"],
                "evaluate": {**d["evaluate"], "models": extra}}
    return {"model": model["name"]}  # report: everything else comes from upstream hashes


def _stage_cfg(cfg: RunConfig, name: str, run_dir: Path) -> RunConfig:
    out = run_dir / DIRS[name]
    p = cfg.pipeline
    if name == "flips":
        return _derive(cfg, out, p.eval_prompts)
    if name == "pairs":
        return _derive(cfg, out, p.train_prompts,
                       pairs={"w4_dir": str(run_dir / DIRS["quantize"]), "overwrite": True})
    if name == "train":
        return _derive(cfg, out, p.train_prompts, train={"pairs": str(run_dir / DIRS["pairs"])})
    if name == "evaluate":
        # The trained export's path is known only after training; _run_evaluate fills it in.
        return _derive(cfg, out, p.eval_prompts)
    if name == "report":
        return cfg.model_copy(update={"out": str(out)})  # the report describes the prompt sets: keep them
    return _derive(cfg, out)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, or unreadable: treated as no marker


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages `cfg` selects, each with its output dir, hash and what a run would do with it (status)."""
    check(cfg)
    run_dir = Path(cfg.out).resolve()
    names = selected(cfg.pipeline.stages)
    stages: dict[str, Stage] = {}
    for name in names:
        deps = tuple(d for d in DEPS[name] if d in stages)
        inputs = {"stage": name, "version": PIPELINE_VERSION, "config": _inputs(cfg, name),
                  "upstream": {d: stages[d].hash for d in deps}}
        st = Stage(name=name, out=run_dir / DIRS[name], hash=_digest(inputs), deps=deps, inputs=inputs,
                   cfg=_stage_cfg(cfg, name, run_dir))
        st.status, st.reason = _status(st, [stages[d] for d in deps])
        stages[name] = st
    return list(stages.values())


def _status(st: Stage, ups: list[Stage]) -> tuple[str, str]:
    m = _read_marker(st.marker)
    running_up = [u.name for u in ups if u.status != "skip"]
    if m is None:
        if st.out.exists():
            return "rerun", "output without a pipeline marker (from another run or tool): rebuilt"
        return "run", "not run yet"
    if m.get("hash") != st.hash:
        diff = _changed(m.get("inputs", {}).get("config", {}), st.inputs["config"])
        ups_changed = [d for d, h in st.inputs["upstream"].items() if m.get("inputs", {}).get("upstream", {}).get(d) != h]
        why = ", ".join(diff[:4] + (["…"] if len(diff) > 4 else [])) or ", ".join(f"upstream {u}" for u in ups_changed)
        return "rerun", f"config changed ({why or 'pipeline version'})"
    if m.get("state") == "running":
        return ("resume", "interrupted run: continuing") if st.name in RESUMABLE else ("rerun", "interrupted run: restarting")
    if running_up:
        return "rerun", f"upstream {', '.join(running_up)} runs"
    if not (st.out / PRODUCT[st.name]).is_file():
        return "run", f"output {DIRS[st.name]}/{PRODUCT[st.name]} is missing"
    return "skip", "done (same config)"


def format_plan(stages: list[Stage]) -> str:
    lines = [f"{'stage':<9} {'status':<7} {'hash':<12}  reason"]
    lines += [f"{s.name:<9} {s.status:<7} {s.hash[:12]}  {s.reason}" for s in stages]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running


def _run_quantize(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.quant.export import run_quantize

    return {"w4_dir": str(run_quantize(st.cfg))}


def _run_flips(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.evaluate.flips import run_flips

    s = run_flips(st.cfg)
    return {k: s[k] for k in ("flip_rate", "n_flips", "n_tokens", "prompts_with_flip")}


def _run_pairs(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.generate.pairs import run_pairs

    s = run_pairs(st.cfg)
    return {k: s[k] for k in ("pairs_generated", "pairs_kept", "identical_rate", "mean_first_divergence")}


def _run_train(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.train.trainer import run_train

    s = run_train(st.cfg)
    if not s.get("export"):
        raise RuntimeError(f"training finished without a W4 export in {st.out}; see {st.out}/summary.json")
    return {"steps": s["steps"], "export": s["export"], "final_loss": (s["final"] or {}).get("loss")}


def trained_export(run_dir: Path) -> str | None:
    """The trained W4 checkpoint of a run directory (from train/summary.json), if training finished."""
    s = _read_marker(Path(run_dir) / DIRS["train"] / "summary.json")
    return s.get("export") if s else None


def _run_evaluate(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.evaluate.compare import run_evaluate

    run_dir = st.out.parent
    export = trained_export(run_dir)
    if not export:
        raise RuntimeError(f"no trained export in {run_dir / DIRS['train']}/summary.json; run the train stage")
    label = Path(export).name.split("-", 1)[-1]  # w4-qdpo → qdpo, w4-qdpo-lora → qdpo-lora
    models = {"rtn": str(run_dir / DIRS["quantize"]), label: export,
              **{k: v for k, v in st.cfg.evaluate.models.items() if k not in ("rtn", label)}}
    cfg = st.cfg.model_copy(update={"evaluate": st.cfg.evaluate.model_copy(update={"models": models})})
    r = run_evaluate(cfg)
    return {label: {k: r["models"][label][k] for k in ("flip_rate", "rouge_l", "exact_match", "perplexity")}
            for label in r["models"]}


def _run_report(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.report import write_report

    run_dir = st.out.parent
    timings = {}
    for name in done:  # only the stages of this plan: an older output of an unselected one may be stale
        m = _read_marker(run_dir / f".stage-{name}.json")
        if m and m.get("state") == "done":
            timings[name] = m.get("wall_s")
    write_report(st.cfg, run_dir, st.out, timings, serve_command(st.cfg, run_dir), include=st.deps)
    return {"report": str(st.out / "README.md")}


RUNNERS: dict[str, Callable[[Stage, dict[str, Stage]], dict[str, Any]]] = {
    "quantize": _run_quantize, "flips": _run_flips, "pairs": _run_pairs, "train": _run_train,
    "evaluate": _run_evaluate, "report": _run_report,
}


def serve_command(cfg: RunConfig, run_dir: Path) -> str | None:
    export = trained_export(run_dir)
    return f"qdpo-ray serve --fp {cfg.model.name} --w4 {export}" if export else None


def _write_marker(st: Stage, state: str, **extra: Any) -> None:
    from qdpo_ray.io import atomic_write_json

    atomic_write_json(st.marker, {"stage": st.name, "hash": st.hash, "state": state, "inputs": st.inputs,
                                  **extra})


def execute(stages: list[Stage], echo: Callable[[str], None] | None = None) -> list[Stage]:
    """Run the planned stages in order (skipping `skip`); a failure leaves that stage `running` and raises."""
    echo = echo or (lambda s: print(s, flush=True))
    done: dict[str, Stage] = {}
    for st in stages:
        if st.status == "skip":
            m = _read_marker(st.marker) or {}
            st.wall_s = m.get("wall_s")
            echo(f"[pipeline] {st.name}: skipped ({st.reason})")
            done[st.name] = st
            continue
        echo(f"[pipeline] {st.name}: {st.status} ({st.reason}) → {st.out}")
        if st.status in ("run", "rerun"):
            # Marker first, then the old output: a crash in between leaves a `running` marker of the
            # new hash, so the next run resumes into a clean directory instead of trusting stale files.
            _write_marker(st, "running", started=time.time())
            if st.out.exists():
                shutil.rmtree(st.out)
        t0 = time.time()
        try:
            outputs = RUNNERS[st.name](st, done)
        except BaseException:
            echo(f"[pipeline] {st.name}: failed after {time.time() - t0:.0f} s; re-run the same command to "
                 "continue from here")
            raise
        st.wall_s = round(time.time() - t0, 1)
        _write_marker(st, "done", wall_s=st.wall_s, finished=time.time(), outputs=outputs)
        echo(f"[pipeline] {st.name}: done in {st.wall_s:.0f} s")
        done[st.name] = st
    return stages


def run_pipeline(cfg: RunConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Plan and run `cfg` in its run directory; returns the per-stage rows, wall time and serve command."""
    from qdpo_ray.config import dump_config

    t0 = time.time()
    stages = plan(cfg)
    run_dir = Path(cfg.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        execute(stages, echo)
    finally:
        # Stop the local Ray the stages started (engines, train workers); a joined cluster stays up.
        if not ray_was_up and "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
    return {"out": str(run_dir), "stages": [s.row() for s in stages], "wall_s": round(time.time() - t0, 1),
            "report": str(run_dir / DIRS["report"]) if any(s.name == "report" for s in stages) else None,
            "serve": serve_command(cfg, run_dir)}
