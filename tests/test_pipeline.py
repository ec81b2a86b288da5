"""`qdpo-ray pipeline`: the stage plan, content hashes, skip / resume / re-run, atomic markers, and one
small real run on the embedded model (then a re-run that skips everything)."""

import json
import math
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from qdpo_ray import pipeline as pl
from qdpo_ray.cli import main
from qdpo_ray.config import PIPELINE_STAGES, ConfigError, PipelineConfig, load_config

REPO = Path(__file__).resolve().parent.parent
# The stages of a plan with pipeline.start_from=rtn (the default): all but ptq.
RTN_STAGES = tuple(s for s in PIPELINE_STAGES if s != "ptq")


def _cfg(out, *over):
    return load_config(None, [f"out={out}", *over])


def _hashes(cfg):
    return {s.name: s.hash for s in pl.plan(cfg)}


@pytest.fixture
def fake_runners(monkeypatch):
    """Stage functions that only write their product file, and record that they ran."""
    calls = []

    def make(name):
        def run(st, done):
            calls.append(name)
            st.out.mkdir(parents=True, exist_ok=True)
            (st.out / pl.SPECS[name].product).write_text("{}")
            return {"ok": True}
        return run

    for name in PIPELINE_STAGES:
        monkeypatch.setitem(pl.RUNNERS, name, make(name))
    return calls


def _run(cfg):
    return pl.execute(pl.plan(cfg), echo=lambda s: None)


def test_each_stage_is_declared_once_in_pipeline_order():
    names = tuple(s.name for s in pl.STAGES)
    assert names == PIPELINE_STAGES == tuple(pl.SPECS) == tuple(pl.RUNNERS)
    (literal,) = typing.get_args(PipelineConfig.model_fields["stages"].annotation)
    assert typing.get_args(literal) == names  # the values `pipeline.stages` accepts
    for i, s in enumerate(pl.STAGES):
        assert set(s.deps) <= set(names[:i]), f"{s.name} depends on a later stage"
    assert len({s.dir for s in pl.STAGES}) == len(names)


def test_plan_of_a_fresh_dir(tmp_path):
    stages = pl.plan(_cfg(tmp_path / "run"))
    assert [s.name for s in stages] == list(RTN_STAGES)
    assert all(s.status == "run" for s in stages)
    by = {s.name: s for s in stages}
    assert by["train"].deps == ("pairs",) and by["evaluate"].deps == ("quantize", "train")
    assert by["pairs"].cfg.pairs.w4_dir == str(by["quantize"].out)
    assert by["train"].cfg.train.pairs == str(by["pairs"].out)
    assert by["pairs"].cfg.prompts.source == "builtin:train" and by["flips"].cfg.prompts.source == "builtin:eval"
    assert by["evaluate"].out == (tmp_path / "run" / "eval").resolve()
    assert len({s.hash for s in stages}) == len(stages)


@pytest.mark.parametrize("override,changed", [
    ("train.lr=1e-5", {"train", "evaluate", "report"}),
    ("quant.bits=8", set(RTN_STAGES)),
    ("flips.max_new_tokens=32", {"flips", "evaluate", "report"}),
    ("pairs.max_new_tokens=32", {"pairs", "train", "evaluate", "report"}),
    ("pipeline.eval_prompts.limit=10", {"flips", "evaluate", "report"}),
    ("pipeline.train_prompts.limit=10", {"pairs", "train", "evaluate", "report"}),
    ("evaluate.perplexity_texts=5", {"evaluate", "report"}),
    ("model.name=some/other-model", set(RTN_STAGES)),
    ("pipeline.dry_run=true", set()),
    ("pairs.overwrite=true", set()),
])
def test_hash_changes_exactly_downstream(tmp_path, override, changed):
    base = _hashes(_cfg(tmp_path))
    new = _hashes(_cfg(tmp_path, override))
    assert {k for k in base if base[k] != new[k]} == changed


def test_hashes_do_not_depend_on_the_run_dir(tmp_path):
    assert _hashes(_cfg(tmp_path / "a")) == _hashes(_cfg(tmp_path / "b"))


def test_stage_selection_adds_what_is_needed(tmp_path):
    assert pl.selected(["evaluate"]) == ["quantize", "ptq", "pairs", "train", "evaluate"]
    plain = pl.plan(_cfg(tmp_path, "pipeline.stages=[evaluate]"))  # ptq only where start_from asks for it
    assert [s.name for s in plain] == ["quantize", "pairs", "train", "evaluate"]
    assert pl.selected(["flips", "report"]) == ["flips", "report"]
    stages = pl.plan(_cfg(tmp_path, "pipeline.stages=[flips, report]"))
    assert [s.name for s in stages] == ["flips", "report"] and stages[1].deps == ("flips",)


def test_awq_qdpo_plan_starts_pairs_and_training_from_the_ptq_model(tmp_path):
    run = (tmp_path / "run").resolve()
    rtn = {s.name: s for s in pl.plan(_cfg(run))}
    awq = {s.name: s for s in pl.plan(_cfg(run, "pipeline.start_from=awq"))}
    assert list(awq) == ["quantize", "ptq", "flips", "pairs", "train", "evaluate", "report"]
    ckpt = str(run / "ptq" / "w4-awq")
    assert awq["ptq"].cfg.ptq.method == "awq" and awq["ptq"].cfg.out == str(run / "ptq")
    assert awq["pairs"].cfg.pairs.w4_dir == ckpt and awq["train"].cfg.train.init_from == ckpt
    assert rtn["pairs"].cfg.pairs.w4_dir == str(run / "w4-rtn") and rtn["train"].cfg.train.init_from is None
    assert awq["pairs"].deps == ("quantize", "ptq") and awq["evaluate"].deps == ("quantize", "ptq", "train")
    # RTN, flips and the RTN export are shared; everything π_q feeds is not
    same = {n for n in rtn if rtn[n].hash == awq[n].hash}
    assert same == {"quantize", "flips"}
    gptq = {s.name: s for s in pl.plan(_cfg(run, "pipeline.start_from=gptq"))}
    assert gptq["ptq"].hash != awq["ptq"].hash and gptq["train"].cfg.train.init_from == str(run / "ptq" / "w4-gptq")
    # the ptq section's calibration settings are the ptq stage's inputs; its interpreter is not
    assert _hashes(_cfg(run, "pipeline.start_from=awq", "ptq.python=/elsewhere/python")) == _hashes(
        _cfg(run, "pipeline.start_from=awq"))
    assert _hashes(_cfg(run, "pipeline.start_from=awq", "ptq.calibration_samples=8"))["ptq"] != awq["ptq"].hash


def test_a_new_ptq_output_format_remakes_the_ptq_stage(tmp_path, monkeypatch):
    """A run directory made before the ptq output changed (AWQ checkpoints without latent weights) must not
    skip ptq: training from it would start on its bin centres and silently move no code."""
    run = (tmp_path / "run").resolve()
    before, rtn = _hashes(_cfg(run, "pipeline.start_from=awq")), _hashes(_cfg(run))
    monkeypatch.setattr(pl, "PTQ_OUTPUT_FORMAT", pl.PTQ_OUTPUT_FORMAT + 1)
    after = _hashes(_cfg(run, "pipeline.start_from=awq"))
    assert {n for n in before if before[n] != after[n]} == {"ptq", "pairs", "train", "evaluate", "report"}
    assert _hashes(_cfg(run)) == rtn  # an RTN plan does not read it


def test_awq_qdpo_run_evaluates_rtn_the_ptq_model_and_the_trained_one(tmp_path, fake_runners, monkeypatch):
    seen = {}

    def train(st, done):
        st.out.mkdir(parents=True)
        (st.out / "summary.json").write_text(json.dumps({"export": str(st.out / "w4-qdpo_flips-kd")}))
        return {}

    def evaluate(cfg):
        seen.update(cfg.evaluate.models)
        return {"models": {k: {"flip_rate": 0.1, "rouge_l": 0.5, "exact_match": 0.0, "perplexity": 5.0}
                           for k in ("fp", *cfg.evaluate.models)}}

    monkeypatch.setitem(pl.RUNNERS, "train", train)
    monkeypatch.setitem(pl.RUNNERS, "evaluate", pl._run_evaluate)
    monkeypatch.setattr("qdpo_ray.evaluate.compare.run_evaluate", evaluate)
    out = (tmp_path / "run").resolve()
    _run(_cfg(out, "pipeline.start_from=awq"))
    assert fake_runners == ["quantize", "ptq", "flips", "pairs", "report"]
    assert seen == {"rtn": str(out / "w4-rtn"), "awq": str(out / "ptq" / "w4-awq"),
                    "awq-qdpo_flips-kd": str(out / "train" / "w4-qdpo_flips-kd")}


def test_a_missing_llmcompressor_environment_stops_the_awq_pipeline_before_any_stage(tmp_path, fake_runners):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="setup_llmcompressor_venv.sh"):
        pl.run_pipeline(_cfg(out, "pipeline.start_from=awq", f"ptq.python={tmp_path / 'none' / 'python'}"),
                        echo=lambda s: None)
    assert fake_runners == []


def test_skip_rerun_and_resume(tmp_path, fake_runners):
    out = tmp_path / "run"
    _run(_cfg(out))
    assert fake_runners == list(RTN_STAGES)
    marker = json.loads((out / ".stage-train.json").read_text())
    assert marker["state"] == "done" and marker["hash"] == _hashes(_cfg(out))["train"]

    fake_runners.clear()
    stages = _run(_cfg(out))
    assert fake_runners == [] and all(s.status == "skip" for s in stages)

    # A changed training field re-runs training and what follows, into a clean directory.
    (out / "train" / "stale.bin").write_text("x")
    stages = pl.plan(_cfg(out, "train.lr=1e-5"))
    assert {s.name: s.status for s in stages} == {"quantize": "skip", "flips": "skip", "pairs": "skip",
                                                  "train": "rerun", "evaluate": "rerun", "report": "rerun"}
    assert "train.lr" in stages[3].reason
    pl.execute(stages, echo=lambda s: None)
    assert fake_runners == ["train", "evaluate", "report"] and not (out / "train" / "stale.bin").exists()


def test_crash_then_continue(tmp_path, fake_runners, monkeypatch):
    out = tmp_path / "run"

    def crash(st, done):
        st.out.mkdir(parents=True, exist_ok=True)
        (st.out / "checkpoint").write_text("half")  # what a resumable stage continues from
        raise RuntimeError("worker died")

    monkeypatch.setitem(pl.RUNNERS, "train", crash)
    with pytest.raises(RuntimeError, match="worker died"):
        _run(_cfg(out))
    assert json.loads((out / ".stage-train.json").read_text())["state"] == "running"
    assert not (out / ".stage-evaluate.json").exists()

    fake_runners.clear()
    resumed = []

    def train_again(st, done):
        resumed.append((st.out / "checkpoint").read_text())  # resumed in place: the checkpoint is still there
        (st.out / "summary.json").write_text("{}")
        return {}

    stages = pl.plan(_cfg(out))
    assert {s.name: s.status for s in stages} == {"quantize": "skip", "flips": "skip", "pairs": "skip",
                                                  "train": "resume", "evaluate": "run", "report": "run"}
    monkeypatch.setitem(pl.RUNNERS, "train", train_again)
    pl.execute(stages, echo=lambda s: None)
    assert resumed == ["half"] and fake_runners == ["evaluate", "report"]
    assert all(s.status == "skip" for s in pl.plan(_cfg(out)))


def test_foreign_output_and_missing_product(tmp_path, fake_runners):
    out = tmp_path / "run"
    (out / "flips").mkdir(parents=True)
    (out / "flips" / "old.txt").write_text("from another tool")
    st = {s.name: s for s in pl.plan(_cfg(out))}
    assert st["flips"].status == "rerun" and "without a pipeline marker" in st["flips"].reason
    _run(_cfg(out))
    assert not (out / "flips" / "old.txt").exists()

    (out / "pairs" / "summary.json").unlink()  # output deleted by hand: pairs and everything after it run
    st = {s.name: s.status for s in pl.plan(_cfg(out))}
    assert st == {"quantize": "skip", "flips": "skip", "pairs": "run", "train": "rerun", "evaluate": "rerun",
                  "report": "rerun"}


def _finished(tmp_path, fake_runners):
    out = tmp_path / "run"
    _run(_cfg(out))
    fake_runners.clear()
    return out


@pytest.mark.parametrize("damage,expect", [
    (lambda m: m.write_text('{"stage": "quantize", "ha'), "is not valid JSON"),
    (lambda m: m.write_bytes(b"\xff\xfe"), "is not valid JSON"),
    (lambda m: m.write_text('{"note": "hand-written"}'), "is not a pipeline marker of stage quantize"),
    (lambda m: m.write_text('["quantize"]'), "is not a pipeline marker"),
    (lambda m: (m.unlink(), m.mkdir()), "Is a directory"),
], ids=["torn", "not-utf8", "foreign-json", "not-a-dict", "directory"])
def test_a_damaged_marker_stops_the_run_and_keeps_the_output(tmp_path, fake_runners, damage, expect):
    out = _finished(tmp_path, fake_runners)
    marker = out / ".stage-quantize.json"
    damage(marker)
    for attempt in (lambda: pl.plan(_cfg(out)), lambda: pl.run_pipeline(_cfg(out), echo=lambda s: None)):
        with pytest.raises(pl.RunDirError, match=expect) as e:
            attempt()
        assert str(marker) in str(e.value) and "delete it to rebuild that stage" in str(e.value)
    assert (out / "w4-rtn" / "config.json").is_file() and fake_runners == []
    assert main(["pipeline", "--out", str(out), "--dry-run"]) == 2  # one line on stderr, no traceback


def test_an_unreadable_marker_stops_the_run(tmp_path, fake_runners, monkeypatch):
    out = _finished(tmp_path, fake_runners)
    marker = out / ".stage-train.json"
    real = Path.read_bytes

    def read_bytes(self):
        if self == marker:  # chmod 000 does not stop root, who runs the tests in CI containers
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(pl.RunDirError, match=re.escape(f"cannot read {marker} (Permission denied)")):
        pl.run_pipeline(_cfg(out), echo=lambda s: None)
    assert (out / "train" / "summary.json").is_file() and fake_runners == []


def test_a_missing_marker_alone_means_not_run(tmp_path, fake_runners):
    out = _finished(tmp_path, fake_runners)
    (out / ".stage-report.json").unlink()
    assert {s.name: s.status for s in pl.plan(_cfg(out))}["report"] == "rerun"


def test_done_marker_is_atomic(tmp_path, fake_runners, monkeypatch):
    """A crash while the done marker is written leaves the `running` marker whole, never half a file."""
    import os

    from qdpo_ray import io

    out = tmp_path / "run"
    cfg = _cfg(out, "pipeline.stages=[quantize]")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".stage-quantize.json") and json.loads(Path(src).read_text())["state"] == "done":
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _run(cfg)
    marker = json.loads((out / ".stage-quantize.json").read_text())
    assert marker["state"] == "running"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert pl.plan(cfg)[0].status == "rerun"  # an interrupted non-resumable stage starts over


def test_a_second_lock_on_the_same_run_dir_fails_at_once(tmp_path):
    run = tmp_path / "run"
    with pl.run_dir_lock(run):
        # flock locks conflict between two opens of the file even within one process
        with pytest.raises(pl.RunDirError, match=f"in use by another `qdpo-ray pipeline` \\(pid {os.getpid()} on "):
            with pl.run_dir_lock(run):
                pass
    with pl.run_dir_lock(run):  # released at the end of the block
        pass


_HOLD = """
import sys, time
from pathlib import Path
from qdpo_ray.pipeline import run_dir_lock
with run_dir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_pipeline_stops_while_another_holds_its_run_dir(tmp_path, fake_runners, capsys):
    out = _finished(tmp_path, fake_runners)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(pl.RunDirError, match=f"{re.escape(str(out))} is in use .*pid {holder.pid} on .*"
                                                 f"lock file .*\\.pipeline\\.lock.*another --out"):
            pl.run_pipeline(_cfg(out, "train.lr=1e-5"), echo=lambda s: None)
        assert fake_runners == [] and json.loads((out / ".stage-train.json").read_text())["state"] == "done"
        assert main(["pipeline", "--out", str(out), "--dry-run"]) == 0  # planning needs no lock
        assert "rerun" not in capsys.readouterr().out
    finally:
        holder.kill()  # the kernel drops a dead process's flock: no stale lock
        holder.wait()
    pl.run_pipeline(_cfg(out, "train.lr=1e-5"), echo=lambda s: None)
    assert fake_runners == ["train", "evaluate", "report"]


def test_unsupported_bits_have_one_message():
    from qdpo_ray.quant.export import require_packable

    with pytest.raises(ConfigError) as e:
        require_packable(3, needs="`qdpo-ray quantize` writes")
    assert str(e.value).startswith("quant.bits=3: `qdpo-ray quantize` writes a packed checkpoint")
    assert "supports (4, 8) bits only; " in str(e.value) and "qdpo-ray flips" in str(e.value)
    with pytest.raises(ConfigError, match=r"quant.bits=2: the pipeline exports and serves a packed .* \(4, 8\)"):
        pl.plan(_cfg("x", "quant.bits=2"))
    require_packable(4), require_packable(8)


def test_report_from_whatever_the_stages_wrote(tmp_path, fake_runners, monkeypatch):
    row = {"model": "x", "flip_rate": 0.3, "rouge_l": 0.4, "exact_match": 0.05, "perplexity": 5.0}

    def evaluate(st, done):
        st.out.mkdir(parents=True)
        (st.out / "results.json").write_text(json.dumps({
            "prompts": "builtin:eval", "n_prompts": 80, "max_new_tokens": 64, "quant": "W4A16",
            "perplexity_texts": "t", "models": {"fp": {**row, "flip_rate": 0.0}, "rtn": row}}))
        return {}

    monkeypatch.setitem(pl.RUNNERS, "evaluate", evaluate)
    monkeypatch.setitem(pl.RUNNERS, "report", pl._run_report)
    out = tmp_path / "run"
    _run(_cfg(out, "pipeline.train_prompts.limit=16"))
    res = json.loads((out / "report" / "results.json").read_text())
    assert set(res["stage_wall_s"]) == {"quantize", "flips", "pairs", "train", "evaluate"}
    assert res["train_prompts"]["limit"] == 16 and res["evaluate"]["models"]["rtn"]["flip_rate"] == 0.3
    readme = (out / "report" / "README.md").read_text()
    assert "# QDPO run report" in readme and "| rtn | 30.0% | 0.400 | 5.0% | 5.00 |" in readme
    assert (out / "report" / "comparison_table.png").is_file()


@pytest.mark.parametrize("override,expect", [
    ("quant.bits=3", "quant.bits=3"),
    ("prompts.limit=5", "pipeline.train_prompts"),
    ("pairs.w4_dir=/some/dir", "pairs.w4_dir"),
    ("train.pairs=runs/x", "train.pairs"),
    ("train.export=false", "train.export"),
    ("pipeline.stages=[]", "pipeline.stages"),
    ("pipeline.stages=[serve]", "pipeline.stages"),
    ("train.init_from=runs/ptq/w4-awq", "pipeline.start_from"),
    ("pipeline.stages=[ptq,train]", "pipeline.start_from=awq"),
    ("pipeline.start_from=awq train.lora.enabled=true", "train.lora.enabled=false"),
    ("pipeline.start_from=spqr", "pipeline.start_from"),
])
def test_bad_pipeline_settings_name_the_field(tmp_path, override, expect, capsys):
    assert main(["pipeline", "--out", str(tmp_path), *(f"--{o}" for o in override.split()), "--dry-run"]) == 2
    assert expect in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert main(["pipeline", "--config", "configs/default.yaml", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for name in RTN_STAGES:
        assert name in text
    assert not (tmp_path / "r").exists()


def test_paper_recipe_loads_and_plans(tmp_path, capsys):
    cfg = load_config(REPO / "configs" / "paper_vicuna7b_hh.yaml", [f"out={tmp_path / 'paper'}"])
    assert cfg.model.name == "lmsys/vicuna-7b-v1.5"
    tp = cfg.pipeline.train_prompts
    assert (tp.source, tp.limit) == ("hf:Anthropic/hh-rlhf", 50000)
    assert (cfg.train.lr, cfg.train.beta, cfg.train.zero_stage) == (3e-6, 0.1, 3)
    assert cfg.quant.label == "W4A16" and cfg.train.objective == "qdpo"
    assert cfg.train.gpus_per_worker >= 1 and cfg.pairs.engine.gpus_per_actor >= 1
    stages = pl.plan(cfg)  # no model, no dataset, no Ray: planning only reads the run dir
    assert [s.name for s in stages] == list(RTN_STAGES) and all(s.status == "run" for s in stages)
    assert main(["pipeline", "--config", "configs/paper_vicuna7b_hh.yaml", "--out", str(tmp_path / "p"),
                 "--dry-run"]) == 0
    assert "train" in capsys.readouterr().out


def test_demo_runs_the_default_pipeline():
    make = (REPO / "Makefile").read_text()
    assert "pipeline --config configs/default.yaml" in make
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.model.name == "smollm2-135m" and cfg.quant.label == "W4A16"


# --------------------------------------------------------------------------------------------------
# A real run (embedded model, real vLLM engines, Ray Train + DeepSpeed), sized to a few minutes.

TINY = ["--pipeline.train_prompts.limit=8", "--pipeline.eval_prompts.limit=8", "--pairs.max_new_tokens=16",
        "--pairs.drop_identical=false", "--pairs.engine.batch_size=4", "--flips.max_new_tokens=16",
        "--train.max_steps=2", "--train.per_device_batch_size=2", "--train.warmup_steps=0",
        "--train.checkpoint_every=2", "--evaluate.perplexity_texts=4"]


@pytest.mark.slow
@pytest.mark.vllm
def test_real_pipeline_then_everything_skipped(tmp_path, embedded_model_dir):
    out = tmp_path / "run"
    args = ["pipeline", "--config", "configs/default.yaml", "--out", str(out), *TINY]
    proc = subprocess.run([sys.executable, "-m", "qdpo_ray.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    objective = load_config(REPO / "configs" / "default.yaml").train.objective
    trained = objective.replace("+", "-")  # the export's label: w4-qdpo_flips-kd → qdpo_flips-kd
    assert f"qdpo-ray serve --fp smollm2-135m --w4 {out.resolve()}/train/w4-{trained}" in proc.stdout

    rep = out / "report"
    for f in ("README.md", "results.json", "margins.png", "training.png", "comparison.png", "comparison_table.png"):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    res = json.loads((rep / "results.json").read_text())
    models = res["evaluate"]["models"]
    assert list(models) == ["fp", "rtn", trained]
    assert models["fp"]["flip_rate"] == 0.0 and models["fp"]["rouge_l"] == pytest.approx(1.0)
    for label in ("rtn", trained):
        m = models[label]
        assert 0.0 < m["flip_rate"] < 1.0 and 0.0 <= m["rouge_l"] <= 1.0 and 0.0 <= m["exact_match"] <= 1.0
        assert 1.0 < m["perplexity"] < 1e4 and math.isfinite(m["perplexity"])
    assert res["evaluate"]["n_prompts"] == 8 and res["flips"]["n_prompts"] == 8 and res["flips"]["n_tokens"] > 0
    assert res["pairs"]["pairs_generated"] == 8 and res["train"]["steps"] == 2
    # π_θ ≡ π_q at step 1 on the embedded model (its fake-quant forward in the Ray Train workers equals the
    # reference's): zero rewards, and eq. 5 is log 2 (plus any KD term)
    first = res["train"]["first"]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3) if objective == "qdpo" else first["loss"] > math.log(2)
    assert set(res["stage_wall_s"]) == {"quantize", "flips", "pairs", "train", "evaluate"}
    readme = (rep / "README.md").read_text()
    assert "| rtn |" in readme and f"| {trained} |" in readme and "qdpo-ray serve" in readme
    assert Path(models[trained]["model"], "config.json").is_file()

    # The same command again: every stage is skipped, nothing is loaded, no Ray is started.
    from qdpo_ray.cli import resolve
    from qdpo_ray.pipeline import run_pipeline

    t0 = time.time()
    _, cfg, _ = resolve(args)
    r = run_pipeline(cfg, echo=lambda s: None)
    assert [s["status"] for s in r["stages"]] == ["skip"] * len(RTN_STAGES)
    assert time.time() - t0 < 20
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    # …and a changed evaluation setting re-runs only evaluate and the report.
    _, cfg2, _ = resolve(args + ["--evaluate.perplexity_texts=3"])
    assert [s.status for s in pl.plan(cfg2)] == ["skip"] * 4 + ["rerun", "rerun"]
