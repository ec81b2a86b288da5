"""`qdpo-ray pipeline`: plan the stages of one run directory, skip those already done, run the rest.

    quantize ─┬──────────► pairs ─► train (+ W4 export) ─► evaluate ─► report
    ptq ──────┘ (π_q = AWQ/GPTQ: `pipeline.start_from`)    ┘            │
    flips ────────────────────────────────────────────────────────────────┘

Each stage is declared once, in `STAGES` (its dependencies, output directory, the file it writes last,
the config fields it reads, the config it runs with and its runner); everything else is derived from
that table. The stage functions themselves are the ones the single-stage commands call (`run_quantize`,
`run_flips`, `run_pairs`, `run_train`, `run_evaluate`).

Run directory (`out`): config.yaml (the resolved config), w4-rtn/, ptq/ (with `start_from` awq or gptq),
flips/, pairs/, train/ (holding the trained W4 export), eval/, report/, one marker per stage, `.stage-<name>.json`, and `.pipeline.lock`,
held by the pipeline running in the directory so that a second one stops at once instead of deleting
the first one's outputs.

A stage's hash is the sha256 of the JSON of the config fields it reads plus its upstream stages' hashes,
so changing `train.lr` re-runs train, evaluate and report but not quantize, flips or pairs. The marker is
written atomically: `running` just before the stage starts, `done` only after it returned. On a re-run:

    done, same hash, output present     skipped
    running, same hash                  resumed: pairs and training continue from their own part files
                                        and checkpoints, the other stages start over
    another hash / output but no marker output removed, stage re-run
    no output, no marker                run
    marker unreadable or not a marker   stop with an error naming the file (never guess and delete)

and every stage downstream of one that runs runs too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from qdpo_ray.config import ConfigError, PipelineConfig, PromptsConfig, RunConfig, TrainConfig
from qdpo_ray.console import watch_progress
from qdpo_ray.quant.ptq import OUTPUT_FORMAT as PTQ_OUTPUT_FORMAT
from qdpo_ray.quant.ptq import checkpoint_dir

# Bump when a stage's outputs change meaning for the same config (invalidates every marker).
PIPELINE_VERSION = 1
LOCK_FILE = ".pipeline.lock"


class RunDirError(ConfigError):
    """The run directory is in a state the pipeline will not guess about (an unreadable marker, another
    pipeline at work); the message names the file and the fix. A ConfigError, so the CLI prints it as a
    one-line error (exit 2) rather than a traceback."""


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage, declared once."""

    name: str
    deps: tuple[str, ...]  # upstream stages, whose outputs this one reads and whose hashes its hash covers
    dir: str  # output directory inside the run directory
    product: str  # the file the stage writes last: a done marker without it means the output was deleted
    inputs: Callable[[dict[str, Any]], dict[str, Any]]  # config (as JSON) → the fields the stage reads
    config: Callable[[RunConfig, Path], RunConfig]  # (pipeline config, run dir) → what the runner gets
    run: Callable[[Stage, dict[str, Stage]], dict[str, Any]]  # (stage, stages done so far) → marker outputs
    resumable: bool = False  # an interrupted run continues from the stage's own part files / checkpoints
    pulls_deps: bool = True  # False: uses whichever of its deps were selected, adds none (the report)
    enabled: Callable[[RunConfig], bool] = lambda cfg: True  # False: not part of this config's plan


@dataclass
class Stage:
    """A stage as planned for one run directory."""

    spec: StageSpec
    out: Path
    hash: str
    deps: tuple[str, ...]  # the spec's deps that this plan holds
    inputs: dict[str, Any]  # what the hash covers; kept in the marker to explain a later re-run
    cfg: RunConfig  # the config handed to the stage function
    status: str = "run"  # skip | resume | run | rerun
    reason: str = ""
    wall_s: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def marker(self) -> Path:
        return self.out.parent / f".stage-{self.name}.json"

    def row(self) -> dict[str, Any]:
        return {"stage": self.name, "status": self.status, "reason": self.reason, "out": str(self.out),
                "hash": self.hash[:12], "wall_s": self.wall_s}


# --------------------------------------------------------------------------------------------------
# The stages


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


def stage_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / SPECS[name].dir


def _without(section: dict[str, Any], *keys: str) -> dict[str, Any]:
    # Drops the fields the pipeline sets itself: their values are covered by the upstream hashes.
    return {k: v for k, v in section.items() if k not in keys}


def _run_quantize(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.quant.export import run_quantize

    return {"w4_dir": str(run_quantize(st.cfg))}


def _run_ptq(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.io import atomic_write_json
    from qdpo_ray.quant.ptq import run_ptq

    path = run_ptq(st.cfg)
    atomic_write_json(st.out / st.spec.product, {"method": st.cfg.ptq.method, "checkpoint": str(path)})
    return {"checkpoint": str(path)}


def start_checkpoint(run_dir: Path, start_from: str, bits: int) -> Path:
    """π_q of a pipeline run: the RTN export, or the ptq stage's AWQ/GPTQ checkpoint."""
    if start_from == "rtn":
        return stage_dir(run_dir, "quantize")
    return checkpoint_dir(stage_dir(run_dir, "ptq"), bits, start_from)


def _run_flips(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.evaluate.flips import run_flips

    s = run_flips(st.cfg)
    return {k: s[k] for k in ("flip_rate", "n_flips", "n_tokens", "prompts_with_flip")}


def _run_pairs(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.generate.pairs import run_pairs

    s = run_pairs(st.cfg)
    return {k: s[k] for k in ("pairs_generated", "pairs_kept", "identical_rate", "mean_first_divergence")}


def _run_train(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.train.rounds import run_rounds

    s = run_rounds(st.cfg)
    if not s.get("export"):
        raise RuntimeError(f"training finished without a W4 export in {st.out}; see {st.out}/summary.json")
    return {"steps": s["steps"], "export": s["export"], "final_loss": (s["final"] or {}).get("loss")}


def _run_evaluate(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.evaluate.compare import run_evaluate

    run_dir = st.out.parent
    export = trained_export(run_dir)
    if not export:
        raise RuntimeError(f"no trained export in {stage_dir(run_dir, 'train')}/summary.json; run the train stage")
    label = Path(export).name.split("-", 1)[-1]  # w4-qdpo → qdpo, w4-qdpo-lora → qdpo-lora
    start = {}
    if "ptq" in done:  # AWQ+QDPO (paper Table 3): the PTQ model beside RTN, the trained label says its start
        method = done["ptq"].cfg.ptq.method
        start = {method: str(start_checkpoint(run_dir, method, st.cfg.quant.bits))}
        label = f"{method}-{label}"
    earlier = {f"{label}-r{r['round']}": r["export"] for r in trained_rounds(run_dir)[:-1]}
    models = {"rtn": str(stage_dir(run_dir, "quantize")), **start, **earlier, label: export,
              **{k: v for k, v in st.cfg.evaluate.models.items() if k not in ("rtn", *start, label)}}
    cfg = st.cfg.model_copy(update={"evaluate": st.cfg.evaluate.model_copy(update={"models": models})})
    r = run_evaluate(cfg)
    return {label: {k: r["models"][label][k] for k in ("flip_rate", "rouge_l", "exact_match", "perplexity")}
            for label in r["models"]}


def _run_report(st: Stage, done: dict[str, Stage]) -> dict[str, Any]:
    from qdpo_ray.report import write_report

    # Only the stages of this plan: an older output of an unselected one may be stale.
    timings = {name: s.wall_s for name, s in done.items()}
    write_report(st.cfg, st.out, {d: done[d].out for d in st.deps}, timings,
                 serve_command(st.cfg, st.out.parent))
    return {"report": str(st.out / st.spec.product)}


# In pipeline order; a stage's deps come before it.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("quantize", deps=(), dir="w4-rtn", product="config.json",
              inputs=lambda d: {"model": d["model"], "quant": d["quant"]},
              config=lambda cfg, run: _derive(cfg, stage_dir(run, "quantize")),
              run=_run_quantize),
    # Only with pipeline.start_from awq/gptq: llm-compressor in its own environment (qdpo_ray/quant/ptq.py).
    StageSpec("ptq", deps=(), dir="ptq", product="summary.json",
              inputs=lambda d: {"model": d["model"], "quant": d["quant"], "method": d["pipeline"]["start_from"],
                                "ptq": _without(d["ptq"], "method", "python"), "format": PTQ_OUTPUT_FORMAT},
              config=lambda cfg, run: _derive(cfg, stage_dir(run, "ptq"), ptq={"method": cfg.pipeline.start_from}),
              run=_run_ptq, enabled=lambda cfg: cfg.pipeline.start_from != "rtn"),
    StageSpec("flips", deps=(), dir="flips", product="summary.json",
              inputs=lambda d: {"model": d["model"], "quant": d["quant"], "prompts": d["pipeline"]["eval_prompts"],
                                "flips": d["flips"]},
              config=lambda cfg, run: _derive(cfg, stage_dir(run, "flips"), cfg.pipeline.eval_prompts),
              run=_run_flips),
    # π_q (RTN, or ptq's checkpoint when that stage is in the plan) gives the rejected answers, and training
    # starts from it on its own grid; the upstream hashes say which one.
    StageSpec("pairs", deps=("quantize", "ptq"), dir="pairs", product="summary.json", resumable=True,
              inputs=lambda d: {"model": d["model"], "prompts": d["pipeline"]["train_prompts"],
                                "pairs": _without(d["pairs"], "w4_dir", "overwrite"), "seed": d["seed"]},
              config=lambda cfg, run: _derive(cfg, stage_dir(run, "pairs"), cfg.pipeline.train_prompts, pairs={
                  "w4_dir": str(start_checkpoint(run, cfg.pipeline.start_from, cfg.quant.bits)), "overwrite": True}),
              run=_run_pairs),
    StageSpec("train", deps=("pairs",), dir="train", product="summary.json", resumable=True,
              inputs=lambda d: {"model": d["model"], "quant": d["quant"], "train": _without(d["train"], "pairs"),
                                "seed": d["seed"]},
              config=lambda cfg, run: _derive(cfg, stage_dir(run, "train"), cfg.pipeline.train_prompts, train={
                  "pairs": str(stage_dir(run, "pairs")),
                  "init_from": None if cfg.pipeline.start_from == "rtn"
                  else str(start_checkpoint(run, cfg.pipeline.start_from, cfg.quant.bits))}),
              run=_run_train),
    # evaluate.models gets the RTN and trained checkpoints from the run directory (_run_evaluate); only
    # the extra models a user adds are config.
    StageSpec("evaluate", deps=("quantize", "ptq", "train"), dir="eval", product="results.json",
              inputs=lambda d: {"model": d["model"], "quant": d["quant"], "prompts": d["pipeline"]["eval_prompts"],
                                "flips": d["flips"],
                                "evaluate": {**d["evaluate"], "models": _without(d["evaluate"]["models"], "rtn")}},
              config=lambda cfg, run: _derive(cfg, stage_dir(run, "evaluate"), cfg.pipeline.eval_prompts),
              run=_run_evaluate),
    # The report reads everything else from its upstream stages (covered by their hashes), and describes
    # the prompt sets, so its config keeps the pipeline section.
    StageSpec("report", deps=("flips", "pairs", "train", "evaluate"), dir="report", product="README.md",
              pulls_deps=False,
              inputs=lambda d: {"model": d["model"]["name"]},
              config=lambda cfg, run: cfg.model_copy(update={"out": str(stage_dir(run, "report"))}),
              run=_run_report),
)
SPECS: dict[str, StageSpec] = {s.name: s for s in STAGES}
# What `execute` calls for each stage; tests put fakes in here.
RUNNERS: dict[str, Callable[[Stage, dict[str, Stage]], dict[str, Any]]] = {s.name: s.run for s in STAGES}


# --------------------------------------------------------------------------------------------------
# Planning (pure: reads markers, never loads a model, starts Ray or writes)


def check(cfg: RunConfig) -> None:
    """Refuse settings the pipeline would silently override; each message names the field and the fix."""
    from qdpo_ray.quant.export import require_packable

    require_packable(cfg.quant.bits, needs="the pipeline exports and serves",
                     hint="use `qdpo-ray flips` to study other bit widths")
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
    if cfg.train.init_from is not None:
        raise ConfigError("train.init_from: the pipeline starts from its own π_q; set pipeline.start_from=awq or "
                          "gptq instead (or run `qdpo-ray train --train.init_from=DIR` on its own)")
    if cfg.pipeline.start_from != "rtn" and cfg.train.lora.enabled:
        raise ConfigError(f"pipeline.start_from={cfg.pipeline.start_from} trains all weights on the PTQ model's "
                          "grid; LoRA trains on an RTN base: set train.lora.enabled=false or pipeline.start_from=rtn")
    if cfg.pipeline.start_from == "rtn" and "ptq" in cfg.pipeline.stages and cfg.pipeline.stages != list(
            PipelineConfig().stages):
        raise ConfigError("pipeline.stages names ptq, which runs only with pipeline.start_from=awq or gptq; "
                          "set one of those or drop ptq from the list")


def selected(stages: list[str]) -> list[str]:
    """The requested stages plus everything they need, in pipeline order."""
    want: set[str] = set()
    todo = list(stages)
    while todo:
        s = todo.pop()
        if s not in want:
            want.add(s)
            if SPECS[s].pulls_deps:
                todo.extend(SPECS[s].deps)
    return [s.name for s in STAGES if s.name in want]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _load_json(path: Path, fix: str) -> Any:
    """The JSON in `path`, or None when there is no such file.

    Anything else that goes wrong raises: callers decide from what they read whether to delete an
    output, so a file that cannot be read must never look like one that is not there.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunDirError(f"cannot read {path} ({e.strerror or e}); {fix}") from e
    try:
        return json.loads(data)
    except ValueError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); {fix}") from e


def _read_marker(path: Path, name: str) -> dict[str, Any] | None:
    """Stage `name`'s marker, or None when it has none (the only case that counts as "not run")."""
    fix = (f"the pipeline stops rather than guess whether stage {name}'s output is finished (and delete it). "
           "Fix the file (permissions, or restore it), or delete it to rebuild that stage")
    m = _load_json(path, fix)
    if m is None:
        return None
    if not (isinstance(m, dict) and m.get("stage") == name and isinstance(m.get("hash"), str)
            and m.get("state") in ("running", "done")):
        raise RunDirError(f"{path} is not a pipeline marker of stage {name} (stage, hash, state); {fix}")
    return m


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages `cfg` selects, each with its output dir, hash and what a run would do with it (status)."""
    check(cfg)
    run_dir = Path(cfg.out).resolve()
    data = cfg.model_dump(mode="json")
    stages: dict[str, Stage] = {}
    for name in selected(cfg.pipeline.stages):
        spec = SPECS[name]
        if not spec.enabled(cfg):
            continue
        deps = tuple(d for d in spec.deps if d in stages)
        inputs = {"stage": name, "version": PIPELINE_VERSION, "config": spec.inputs(data),
                  "upstream": {d: stages[d].hash for d in deps}}
        st = Stage(spec=spec, out=stage_dir(run_dir, name), hash=_digest(inputs), deps=deps, inputs=inputs,
                   cfg=spec.config(cfg, run_dir))
        st.status, st.reason = _status(st, [stages[d] for d in deps])
        stages[name] = st
    return list(stages.values())


def _status(st: Stage, ups: list[Stage]) -> tuple[str, str]:
    m = _read_marker(st.marker, st.name)
    running_up = [u.name for u in ups if u.status != "skip"]
    if m is None:
        if st.out.exists():
            return "rerun", "output without a pipeline marker (from another run or tool): rebuilt"
        return "run", "not run yet"
    if m["hash"] != st.hash:
        old = m.get("inputs", {})
        diff = _changed(old.get("config", {}), st.inputs["config"])
        ups_changed = [d for d, h in st.inputs["upstream"].items() if old.get("upstream", {}).get(d) != h]
        why = ", ".join(diff[:4] + (["…"] if len(diff) > 4 else [])) or ", ".join(f"upstream {u}" for u in ups_changed)
        return "rerun", f"config changed ({why or 'pipeline version'})"
    if m["state"] == "running":
        return ("resume", "interrupted run: continuing") if st.spec.resumable else ("rerun", "interrupted run: restarting")
    if running_up:
        return "rerun", f"upstream {', '.join(running_up)} runs"
    if not (st.out / st.spec.product).is_file():
        return "run", f"output {st.spec.dir}/{st.spec.product} is missing"
    return "skip", "done (same config)"


def format_plan(stages: list[Stage]) -> str:
    lines = [f"{'stage':<9} {'status':<7} {'hash':<12}  reason"]
    lines += [f"{s.name:<9} {s.status:<7} {s.hash[:12]}  {s.reason}" for s in stages]
    return "\n".join(lines)


def dry_run_text(cfg: RunConfig) -> str:
    """What `--dry-run` prints: the stage plan, then each stage's GPUs, memory, disk and time (`qdpo-ray plan`)."""
    from qdpo_ray.plan import run_plan

    try:
        resources = run_plan(cfg)[0]
    except ConfigError as e:
        resources = f"resources: not planned ({e})"
    return f"{format_plan(plan(cfg))}\n\n{resources}"


# --------------------------------------------------------------------------------------------------
# Running


def trained_export(run_dir: Path) -> str | None:
    """The trained W4 checkpoint of a run directory (from train/summary.json), if training finished."""
    path = stage_dir(run_dir, "train") / "summary.json"
    s = _load_json(path, "re-run the train stage (delete .stage-train.json) to write it again")
    return s.get("export") if isinstance(s, dict) else None


def trained_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """Every on-policy round of the train stage (one entry for a single round)."""
    s = _load_json(stage_dir(run_dir, "train") / "summary.json",
                   "re-run the train stage (delete .stage-train.json) to write it again")
    return s.get("rounds", []) if isinstance(s, dict) else []


def serve_command(cfg: RunConfig, run_dir: Path) -> str | None:
    export = trained_export(run_dir)
    return f"qdpo-ray serve --fp {cfg.model.name} --w4 {export}" if export else None


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold `<run_dir>/.pipeline.lock` for the block; raise at once if another pipeline holds it.

    flock, so the kernel releases the lock when its holder dies however it dies: a crash leaves no stale
    lock to clean up. The file keeps the holder's PID and host for the error message; it is never
    removed (removing it would let a third pipeline lock a fresh file while the second holds the old one).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")  # no truncation before the lock
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "PID not yet recorded"
            raise RunDirError(f"{run_dir} is in use by another `qdpo-ray pipeline` ({holder}; lock file {path}); "
                              "wait for it to finish or stop it, or choose another --out") from None
        except OSError as e:  # e.g. a network filesystem mounted without lock support
            raise RunDirError(f"cannot lock {path} ({e.strerror or e}): the pipeline needs file locks to keep two "
                              "runs out of one directory; put --out on a filesystem that supports flock") from e
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


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
            st.wall_s = (_read_marker(st.marker, st.name) or {}).get("wall_s")
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
            with watch_progress(st.out, echo, f"[pipeline] {st.name}: "):
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
    check(cfg)  # a bad setting stops the run before the directory is created
    run_dir = Path(cfg.out).resolve()
    with run_dir_lock(run_dir):
        # Planned under the lock: another pipeline's half-written outputs must not shape this plan.
        stages = plan(cfg)
        if any(s.name == "ptq" and s.status != "skip" for s in stages):
            from qdpo_ray.quant.ptq import ptq_python

            ptq_python(cfg.ptq.python)  # no llm-compressor environment: say how to make one before any stage runs
        dump_config(cfg, run_dir / "config.yaml")
        ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        try:
            execute(stages, echo)
        finally:
            # Stop the local Ray the stages started (engines, train workers); a joined cluster stays up.
            if not ray_was_up and "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()
    names = [s.name for s in stages]
    return {"out": str(run_dir), "stages": [s.row() for s in stages], "wall_s": round(time.time() - t0, 1),
            "report": str(stage_dir(run_dir, "report")) if "report" in names else None,
            "serve": serve_command(cfg, run_dir)}
