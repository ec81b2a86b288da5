"""MT-Bench judge: tie rules, verdict parsing, and real HTTP calls to a scripted OpenAI-compatible server
(position swap, reference answers, the cache, retries and failures, the API key, the report, the CLI)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest
import torch

from qdpo_ray.config import ConfigError, JudgeConfig, load_config
from qdpo_ray.evaluate import judge as J


# --------------------------------------------------------------------------------------------------
# A tiny real OpenAI-compatible server: POST /v1/chat/completions answered by a responder


class FakeJudge:
    """Answers chat completions with `responder(body, index)` → reply text, or (status, raw body bytes).

    Every request (JSON body and headers) is recorded, so tests can count them and read the prompts.
    """

    def __init__(self, responder: Callable[[dict, int], Any]):
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with outer.lock:
                    idx = len(outer.requests)
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    outer.requests.append({"path": self.path, "body": body, "headers": headers})
                out = outer.responder(body, idx)
                if isinstance(out, tuple):
                    status, raw = out
                else:
                    status, raw = 200, json.dumps({
                        "id": f"cmpl-{idx}", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(responder):
        s = FakeJudge(responder)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def user_text(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def is_pair(body: dict) -> bool:
    return "two AI assistants" in body["messages"][0]["content"]


def section_a(text: str) -> str:
    """The part of a pairwise prompt before assistant B's answer (A's answer, question, references)."""
    return text.split("The Start of Assistant B", 1)[0]


def prefer(marker: str, rating: str = "Rating: [[7]]") -> Callable[[dict, int], str]:
    """A judge that prefers the answer containing `marker`, and rates every single answer alike."""
    def responder(body, idx):
        if not is_pair(body):
            return f"Fine answer. {rating}"
        return "Explanation… [[A]]" if marker in section_a(user_text(body)) else "Explanation… [[B]]"
    return responder


def cfg_for(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"base_url": url, "model": "judge-x", "concurrency": 2, "max_retries": 2,
                          "backoff_s": 0.01, "timeout_s": 10, **kw})


@pytest.fixture(scope="module")
def questions():
    """One writing question (no reference) and one math question (with GPT-4 reference answers)."""
    qs = {q["question_id"]: q for q in J.load_questions()}
    return [qs[81], qs[111]]


def make_answers(tag: str, qids=(81, 111)) -> dict[int, list[str]]:
    return {q: [f"{tag} answer to turn 1 of {q}", f"{tag} answer to turn 2 of {q}"] for q in qids}


ANSWERS = {"fp": make_answers("BASE"), "rtn": make_answers("CAND")}
N_CALLS = 2 * 2 * 2 + 2 * 2 * 2   # pairwise: 2 questions × 2 turns × 2 orders; single: × 2 models


# --------------------------------------------------------------------------------------------------
# Pure functions


def test_tie_rules_on_hand_made_verdicts():
    W, L, T, E = "win", "loss", "tie", "error"
    cases = {   # (order 1, order 2) → (paper, fastchat)
        (W, W): (["win"], ["win"]), (L, L): (["loss"], ["loss"]),
        (W, L): (["tie"], ["tie"]), (L, W): (["tie"], ["tie"]),      # reversed: position bias
        (T, T): (["tie"], ["tie"]),
        (W, T): (["win"], ["tie"]), (T, L): (["loss"], ["tie"]),     # one decisive verdict + a tie
        (E, W): (["error"], ["error"]), (T, E): (["error"], ["error"]),
    }
    for (o1, o2), (paper, fastchat) in cases.items():
        assert J.combine_orders(o1, o2, "paper") == paper, (o1, o2)
        assert J.combine_orders(o1, o2, "fastchat") == fastchat, (o1, o2)
        assert J.combine_orders(o1, o2, "per_order") == [o1, o2]
    # the literal A.4 variant: a tie in one order is a tie; two ties left out (Table 1's counts)
    assert J.combine_orders(W, T, "paper", one_tie="tie") == ["tie"]
    assert J.combine_orders(T, T, "paper", double_tie="exclude") == ["excluded"]
    with pytest.raises(ValueError):
        J.combine_orders(W, W, "elo")

    seq = [(W, W), (W, W), (L, L), (L, L), (L, L), (W, L), (T, T), (W, T), (T, L), (E, W)]
    paper = J.tally_rule(seq, "paper")
    assert (paper["win"], paper["tie"], paper["loss"], paper["total"], paper["errors"]) == (3, 2, 4, 9, 1)
    assert paper["lose_rate"] == pytest.approx(4 / 9)
    fc = J.tally_rule(seq, "fastchat")
    assert (fc["win"], fc["tie"], fc["loss"], fc["total"], fc["errors"]) == (2, 4, 3, 9, 1)
    assert fc["lose_rate"] == pytest.approx(3 / 9)
    po = J.tally_rule(seq, "per_order")
    assert (po["win"], po["tie"], po["loss"], po["errors"]) == (7, 4, 8, 1)
    ex = J.tally_rule(seq, "paper", double_tie="exclude")
    assert (ex["tie"], ex["total"], ex["excluded"]) == (1, 8, 1)
    assert J.tally([])["lose_rate"] is None


def test_order_outcome_maps_positions_to_the_candidate():
    assert [J.order_outcome(v, 1) for v in ("A", "B", "tie", "error")] == ["win", "loss", "tie", "error"]
    assert [J.order_outcome(v, 2) for v in ("A", "B", "tie", "error")] == ["loss", "win", "tie", "error"]


@pytest.mark.parametrize("text,verdict", [
    ("Assistant A is more accurate. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equally good.\n\nFinal verdict: [[C]]", "tie"),
    ('Format: "[[A]]" if A is better… After comparing, B wins: [[B]]', "B"),   # the last tag counts
    ("I prefer assistant A.", "error"),
    ("[A]", "error"),
    ("\x00\x01 {garbage} ]]A[[", "error"),
    ("", "error"),
    (None, "error"),
])
def test_parse_pair_verdict(text, verdict):
    assert J.parse_pair_verdict(text) == verdict


@pytest.mark.parametrize("text,rating", [
    ("Good answer. Rating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [6]", 6.0),                      # FastChat's fallback pattern
    ("like [[5]] in the format… Rating: [[9]]", 9.0),
    ("Rating: [[11]]", None),                  # outside 1–10
    ("Rating: [[0]]", None),
    ("[[A]]", None),
    ("no number here", None),
    (None, None),
])
def test_parse_rating(text, rating):
    assert J.parse_rating(text) == rating


def test_prompts_and_references_follow_fastchat(questions):
    prompts = J.load_judge_prompts()
    writing, math = questions
    p, msgs = J.pair_messages(prompts, writing, 1, ["aa"], ["bb"])
    assert p.name == "pair-v2" and "Reference" not in msgs[1]["content"]
    assert msgs[0]["role"] == "system" and "[[C]]" in msgs[0]["content"]
    p, msgs = J.pair_messages(prompts, math, 2, ["a1", "a2"], ["b1", "b2"])
    assert p.name == "pair-math-v1-multi-turn"
    text = msgs[1]["content"]
    assert math["reference"][0] in text and math["reference"][1] in text
    assert text.index("a1") < text.index("a2") < text.index("b1") < text.index("b2")
    p, msgs = J.single_messages(prompts, math, 1, ["x"])
    assert p.name == "single-math-v1" and math["reference"][0] in msgs[1]["content"]
    assert J.single_messages(prompts, writing, 2, ["x", "y"])[0].name == "single-v1-multi-turn"


def test_answers_files(tmp_path):
    p = J.save_answers(tmp_path / "fp.jsonl", {"81": ["a", "b"], 111: {"turns": ["c", "d"]}}, model="fp")
    assert J.load_answers(p) == {81: ["a", "b"], 111: ["c", "d"]}
    assert json.loads(p.read_text().splitlines()[0]) == {"question_id": 81, "turns": ["a", "b"], "model": "fp"}
    fastchat = tmp_path / "fc.jsonl"
    fastchat.write_text(json.dumps({"question_id": 81, "model_id": "m", "choices": [{"index": 0, "turns": ["x", "y"]}]}) + "\n")
    assert J.load_answers(fastchat) == {81: ["x", "y"]}
    obj = tmp_path / "a.json"
    obj.write_text(json.dumps({"81": ["x", "y"]}))
    assert J.load_answers(obj) == {81: ["x", "y"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(ConfigError, match="question_id"):
        J.load_answers(bad)
    with pytest.raises(ConfigError, match="not found"):
        J.load_answers(tmp_path / "missing.jsonl")


def test_question_filters():
    assert [q["question_id"] for q in J.load_questions(limit=3, categories=["math"])] == [111, 112, 113]
    assert all(q["reference"] for q in J.load_questions(categories=["coding", "reasoning"]))
    with pytest.raises(ConfigError, match="categories"):
        J.load_questions(categories=["poetry"])


# --------------------------------------------------------------------------------------------------
# Real HTTP


def test_position_swap_and_references_in_requests(fake, questions, tmp_path):
    srv = fake(prefer("CAND"))
    report = J.judge_answers(cfg_for(srv.url), ANSWERS, baseline="fp", questions=questions,
                             cache_path=tmp_path / "c.jsonl")
    assert srv.count == N_CALLS
    pair_reqs = [r["body"] for r in srv.requests if is_pair(r["body"])]
    assert len(pair_reqs) == 8
    for qid in (81, 111):
        for turn in (1, 2):
            texts = [user_text(b) for b in pair_reqs if f"turn 1 of {qid}" in user_text(b)
                     and ((f"turn 2 of {qid}" in user_text(b)) == (turn == 2))]
            assert len(texts) == 2          # both orders
            a_sides = sorted("CAND" in section_a(t) for t in texts)
            assert a_sides == [False, True]  # the candidate is A once and B once
            for t in texts:                  # …and the baseline takes the other seat
                assert ("BASE" in section_a(t)) != ("CAND" in section_a(t))
    math_texts = [user_text(b) for b in pair_reqs if "of 111" in user_text(b)]
    ref1, ref2 = questions[1]["reference"]
    assert all(ref1 in t for t in math_texts)
    assert sum(ref2 in t for t in math_texts) == 2        # turn 2 shows both reference turns
    assert not any("Reference" in user_text(b) for b in pair_reqs if "of 81" in user_text(b))
    for b in (r["body"] for r in srv.requests):
        assert (b["model"], b["temperature"], b["max_tokens"]) == ("judge-x", 0.0, 2048)

    e = report["pairwise"]["rtn"]
    for rule in ("paper", "fastchat"):   # a consistent judge: the candidate wins every game
        assert (e[rule]["win"], e[rule]["tie"], e[rule]["loss"], e[rule]["lose_rate"]) == (4, 0, 0, 0.0)
    assert (e["per_order"]["win"], e["per_order"]["total"]) == (8, 8)
    assert e["position_consistency"] == 1.0
    assert report["single"]["rtn"]["average"] == 7.0
    assert report["single"]["fp"]["by_category"] == {"writing": 7.0, "math": 7.0}


def test_position_biased_judge_gives_ties(fake, questions):
    srv = fake(lambda body, idx: "[[A]]" if is_pair(body) else "[[5]]")
    report = J.judge_answers(cfg_for(srv.url, modes=["pairwise"]), ANSWERS, questions=questions)
    e = report["pairwise"]["rtn"]
    assert (e["paper"]["tie"], e["fastchat"]["tie"], e["paper"]["total"]) == (4, 4, 4)
    assert (e["per_order"]["win"], e["per_order"]["loss"]) == (4, 4)
    assert e["position_consistency"] == 0.0
    assert report["single"] == {}


def test_cache_second_run_makes_no_request(fake, questions, tmp_path):
    srv = fake(prefer("BASE"))
    cache = tmp_path / "cache.jsonl"
    cfg = cfg_for(srv.url)
    r1 = J.judge_answers(cfg, ANSWERS, questions=questions, cache_path=cache)
    assert srv.count == N_CALLS and r1["calls"]["requests"] == N_CALLS
    assert len(cache.read_text().splitlines()) == N_CALLS
    r2 = J.judge_answers(cfg, ANSWERS, questions=questions, cache_path=cache)
    assert srv.count == N_CALLS                      # zero new requests
    assert (r2["calls"]["requests"], r2["calls"]["cached"]) == (0, N_CALLS)
    assert r2["pairwise"] == r1["pairwise"] and r2["single"] == r1["single"]
    assert r1["pairwise"]["rtn"]["paper"]["lose_rate"] == 1.0

    # a changed turn-1 answer re-asks only what shows it: pairwise turns 1 and 2 (both orders), single turns 1-2
    changed = {"fp": ANSWERS["fp"], "rtn": {**ANSWERS["rtn"], 81: ["CAND new", ANSWERS["rtn"][81][1]]}}
    J.judge_answers(cfg, changed, questions=questions, cache_path=cache)
    assert srv.count == N_CALLS + 6
    # another judge model or a torn last line (a crash mid-write) is handled too
    with open(cache, "a") as f:
        f.write('{"key": "trunc')
    r4 = J.judge_answers(cfg_for(srv.url, modes=["single"], turns=[1]), ANSWERS, questions=questions,
                         cache_path=cache)
    assert r4["calls"]["cache_bad_lines"] == 1 and r4["calls"]["requests"] == 0
    J.judge_answers(cfg_for(srv.url, modes=["single"], turns=[1]).model_copy(update={"model": "judge-y"}),
                    ANSWERS, questions=questions, cache_path=cache)
    assert srv.count == N_CALLS + 6 + 4
    assert all(json.loads(line) for line in cache.read_text().splitlines()[-4:])


def test_failing_judge_is_retried_recorded_and_not_fatal(fake, questions, tmp_path):
    """Question 81 always gets 500; every first attempt on question 111 fails once; the run finishes."""
    seen: set[str] = set()
    lock = threading.Lock()
    broken = {"on": True}

    def responder(body, idx):
        text = user_text(body)
        if "of 81" in text and broken["on"]:
            return 500, b'{"error": {"message": "judge overloaded"}}'
        with lock:
            first = text not in seen
            seen.add(text)
        if first:
            return 500, b'{"error": {"message": "transient"}}'
        return prefer("CAND")(body, idx)

    srv = fake(responder)
    cache = tmp_path / "cache.jsonl"
    cfg = cfg_for(srv.url)
    report = J.judge_answers(cfg, ANSWERS, questions=questions, cache_path=cache)
    per_q = N_CALLS // 2
    assert report["errors"]["api_errors"] == per_q                      # every call on question 81
    assert report["calls"]["retries"] == per_q * 2 + per_q              # 81: 2 retries each; 111: 1 each
    assert srv.count == per_q * 3 + per_q * 2
    e = report["pairwise"]["rtn"]
    assert (e["paper"]["win"], e["paper"]["errors"], e["api_errors"]) == (2, 2, 4)
    assert report["single"]["fp"]["by_category"] == {"writing": None, "math": 7.0}
    recs = [json.loads(line) for line in cache.read_text().splitlines()]
    errs = [r for r in recs if r["status"] == "api_error"]
    assert len(errs) == per_q and all("overloaded" in r["error"] and r["attempts"] == 3 for r in errs)
    assert J.judge_markdown(report).count("failed after retries") == 1

    broken["on"] = False        # the endpoint recovers: a re-run asks only for the failed items
    before = srv.count
    report2 = J.judge_answers(cfg, ANSWERS, questions=questions, cache_path=cache)
    assert report2["errors"]["api_errors"] == 0 and report2["calls"]["cached"] == per_q
    assert srv.count - before == per_q * 2                              # each: one transient 500, one answer
    assert report2["pairwise"]["rtn"]["paper"]["win"] == 4


def test_garbage_replies_are_counted_not_fatal(fake, questions):
    def responder(body, idx):
        text = user_text(body)
        if "of 81" in text:
            return "I cannot decide, both are fine."       # a reply without a verdict
        if "turn 2 of 111" in text:
            return 200, b"<html>not json</html>"            # a broken endpoint
        return prefer("CAND")(body, idx)

    srv = fake(responder)
    report = J.judge_answers(cfg_for(srv.url, max_retries=1), ANSWERS, questions=questions)
    assert report["errors"]["unparsed"] == 8                           # all calls on question 81
    assert report["errors"]["api_errors"] == 4                         # turn 2 of 111: pair ×2, single ×2
    e = report["pairwise"]["rtn"]
    assert (e["unparsed"], e["api_errors"], e["paper"]["win"], e["paper"]["errors"]) == (4, 2, 1, 3)
    assert report["single"]["rtn"]["rated"] == 1


def test_a_judge_that_never_gives_a_verdict_is_not_asked_past_the_probe(fake, questions, tmp_path):
    """A judge that continues the answers instead of judging them (what SmolLM2-135M does): after the first
    `probe_calls` replies without a verdict or rating the rest is not asked, also on a re-run from the cache."""
    srv = fake(lambda body, idx: "The bustling marketplace of the city was a vibrant tapestry of colours.")
    cache = tmp_path / "cache.jsonl"
    cfg = cfg_for(srv.url, probe_calls=5)
    report = J.judge_answers(cfg, ANSWERS, questions=questions, cache_path=cache)
    assert srv.count == 5 and report["calls"]["planned"] == N_CALLS
    assert report["stopped"] == {"probe": 5, "unparsed": 5, "api_errors": 0, "not_asked": N_CALLS - 5}
    assert report["errors"]["unparsed"] == 5
    assert "Stopped after the first 5 judge calls" in J.judge_markdown(report)
    again = J.judge_answers(cfg, ANSWERS, questions=questions, cache_path=cache)
    assert srv.count == 5 and again["stopped"]["not_asked"] == N_CALLS - 5      # the cached probe decides
    # `probe_calls: 0` asks everything; one usable reply in the probe lets the run go on
    assert J.judge_answers(cfg_for(srv.url, probe_calls=0), ANSWERS, questions=questions)["stopped"] is None
    assert srv.count == 5 + N_CALLS
    one_ok = fake(lambda body, idx: "Rating: [[6]]" if idx == 3 else "no verdict here")  # call 4: a grading
    r = J.judge_answers(cfg_for(one_ok.url, probe_calls=5, concurrency=1), ANSWERS, questions=questions)
    assert r["stopped"] is None and one_ok.count == N_CALLS


def test_api_key_comes_from_env_and_is_never_written(fake, questions, tmp_path, monkeypatch):
    secret = "sk-test-3f9a7c1e5b"
    monkeypatch.setenv("QDPO_JUDGE_TEST_KEY", secret)
    srv = fake(prefer("CAND"))
    cfg = cfg_for(srv.url, api_key_env="QDPO_JUDGE_TEST_KEY", modes=["single"], turns=[1])
    report = J.judge_answers(cfg, ANSWERS, questions=questions, cache_path=tmp_path / "c.jsonl")
    assert {r["headers"].get("authorization") for r in srv.requests} == {f"Bearer {secret}"}
    J.write_judge_report(report, tmp_path / "out")
    for p in [tmp_path / "c.jsonl", *(tmp_path / "out").iterdir()]:
        assert secret.encode() not in p.read_bytes(), p
    monkeypatch.delenv("QDPO_JUDGE_TEST_KEY")
    J.judge_answers(cfg, ANSWERS, questions=questions)
    assert srv.requests[-1]["headers"].get("authorization") == "Bearer EMPTY"


def test_report_files(fake, questions, tmp_path):
    srv = fake(prefer("BASE"))
    answers = {**ANSWERS, "qdpo": make_answers("CAND")}
    report = J.judge_answers(cfg_for(srv.url), answers, questions=questions)
    assert set(report["pairwise"]) == {"rtn", "qdpo"} and set(report["single"]) == {"fp", "rtn", "qdpo"}
    paths = J.write_judge_report(report, tmp_path / "rep")
    assert json.loads(paths["json"].read_text())["pairwise"]["qdpo"]["paper"]["loss"] == 4
    md = paths["md"].read_text()
    assert "| rtn | paper (A.4, Table 1) | 0 | 0 | 4 | 1.00 |" in md
    assert "| math | 7.00 | 7.00 | 7.00 |" in md and "**average**" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="baseline"):
        J.judge_answers(cfg_for(srv.url), {"rtn": ANSWERS["rtn"]}, questions=questions)


def test_answer_agreement_scores_each_turn_against_the_baseline():
    qs = [{"question_id": 1}, {"question_id": 2}, {"question_id": 3}]
    answers = {"fp": {1: ["a b c d", "x y"], 2: ["p q", "r s"]},          # no answer to question 3
               "m": {1: ["a b c d", "x z"], 2: ["p q"], 3: ["u", "v"]}}   # turn 2 of question 2 missing
    a = J.answer_agreement(answers, "fp", qs, (1, 2))
    assert set(a) == {"m"}
    assert a["m"]["by_turn"]["1"] == {"rouge_l": 1.0, "exact_match": 1.0, "answers": 2}
    assert a["m"]["by_turn"]["2"] == {"rouge_l": 0.5, "exact_match": 0.0, "answers": 1}  # LCS "x": P = R = 1/2
    assert a["m"]["answers"] == 3
    assert a["m"]["rouge_l"] == pytest.approx(2.5 / 3) and a["m"]["exact_match"] == pytest.approx(2 / 3)
    assert a["m"]["rouge_l_minus"] == {}
    # a second model: its difference from m over the answers both have, with an interval
    answers["n"] = {1: ["a b c d", "x y"], 2: ["p q", "r s"]}
    a = J.answer_agreement(answers, "fp", qs, (1, 2))
    assert a["n"]["rouge_l_minus"]["m"] == pytest.approx((0.5 / 3, 0.0, 0.5))  # 1 − 1, 1 − 1, 1 − 0.5
    report = {"judge": {"model": "j", "base_url": "u", "temperature": 0}, "questions": 3, "turns": [1, 2],
              "baseline": "fp", "pairwise": {}, "single": {}, "agreement": a, "errors": {"api_errors": 0, "unparsed": 0}}
    md = J.judge_markdown(report)
    assert "| m | 0.833 | 1.000 | 0.500 | 66.7% | 3 |" in md and "| n − m | +0.167 [+0.000, +0.500] |" in md


def test_no_judge_modes_report_the_answers_agreement_only(questions, tmp_path):
    cfg = cfg_for("http://127.0.0.1:9/v1", modes=[])  # nothing listens there: no call may be made
    report = J.judge_answers(cfg, {**ANSWERS, "same": make_answers("BASE")}, questions=questions)
    assert report["pairwise"] == {} and report["single"] == {} and report["calls"]["requests"] == 0
    assert report["agreement"]["same"]["rouge_l"] == 1.0 and report["agreement"]["same"]["exact_match"] == 1.0
    assert report["agreement"]["rtn"]["exact_match"] == 0.0 and report["agreement"]["rtn"]["answers"] == 4
    paths = J.write_judge_report(report, tmp_path / "rep")
    md = paths["md"].read_text()
    assert md.startswith("# MT-Bench answers against the baseline's (no judge)") and "Pairwise" not in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from qdpo_ray.evaluate.compare import judge_summary, results_table  # `evaluate`'s table names no judge
    table = results_table({"prompts": "p", "n_prompts": 1, "max_new_tokens": 8, "perplexity_texts": "t",
                           "models": {"fp": {}, "rtn": {}}, "judge": judge_summary(report)})
    assert "no judge asked" in table and "Judge:" not in table


def test_cli_judge_command(fake, tmp_path, capsys):
    from qdpo_ray.cli import main

    srv = fake(prefer("CAND"))
    for label, tag in (("fp", "BASE"), ("rtn", "CAND")):
        J.save_answers(tmp_path / f"{label}.jsonl", make_answers(tag, qids=(111,)))
    rc = main(["judge", "--config", "configs/evaluate_judge.yaml", "--out", str(tmp_path / "out"),
               f"--evaluate.judge.base_url={srv.url}", "--evaluate.judge.categories=[math]",
               "--evaluate.judge.questions_limit=1", "--evaluate.judge.backoff_s=0",
               f"--evaluate.judge.answers.fp={tmp_path / 'fp.jsonl'}",
               f"--evaluate.judge.answers.rtn={tmp_path / 'rtn.jsonl'}"])
    assert rc == 0, capsys.readouterr()
    assert srv.count == 2 * 2 + 2 * 2
    assert {"judge.json", "judge.md", "judge.png", "judge_cache.jsonl"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "lose-rate" in capsys.readouterr().out
    assert main(["judge", "--out", str(tmp_path / "o2")]) == 2      # no answers configured: a clear error


def test_judge_config_section():
    cfg = load_config("configs/evaluate_judge.yaml")
    assert isinstance(cfg.evaluate.judge, JudgeConfig) and cfg.evaluate.judge.temperature == 0.0
    assert load_config(None).evaluate.judge is None
    with pytest.raises(ConfigError, match=r"evaluate\.judge\.concurrency"):
        load_config(None, ["--evaluate.judge.concurrency=0"])
    with pytest.raises(ConfigError, match=r"evaluate\.judge\.turns"):
        load_config(None, ["--evaluate.judge.turns=[3]"])


# --------------------------------------------------------------------------------------------------
# `qdpo-ray evaluate` with a judge: MT-Bench answers generated per model, judged, cached


def test_turn_two_sees_the_models_own_first_answer(tiny_model_dir, questions):
    from qdpo_ray.config import ModelConfig
    from qdpo_ray.data import format_prompt
    from qdpo_ray.evaluate.answers import mtbench_answers, transformers_generator
    from qdpo_ray.generate.hf import greedy_generate
    from qdpo_ray.models import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir, dtype="float32"), load_tokenizer(tiny_model_dir)
    mc = ModelConfig(name=tiny_model_dir)
    got = mtbench_answers(transformers_generator(model, tok, 6, batch_size=2), tok, questions[:1], mc, turns=2)
    q = questions[0]
    a1, a2 = got[q["question_id"]]
    # turn 2 is the greedy continuation of [question 1, the model's answer 1, question 2]
    ids = format_prompt(tok, [q["turns"][0], a1, q["turns"][1]], mc)
    assert a2 == tok.decode(greedy_generate(model, tok, [ids], 6)[0], skip_special_tokens=True).strip()
    text = tok.decode(ids)
    assert text.index(q["turns"][0]) < text.index(a1) < text.index(q["turns"][1])
    beams = mtbench_answers(transformers_generator(model, tok, 6, num_beams=3), tok, questions[:1], mc, turns=1)
    assert len(beams[q["question_id"]]) == 1  # beam search runs (Table 5); only turn 1 asked


def test_vllm_beam_search_reuses_short_prefixes():
    """vLLM's beam search re-submits every beam's whole sequence at each step: without prefix caching in
    small KV blocks (CPU's default block is 128 tokens) it ran 3.3× slower on 8 MT-Bench questions."""
    import torch

    from qdpo_ray.generate.engine import CPU_PREFIX_BLOCK
    from qdpo_ray.generate.vllm_greedy import _engine_kwargs

    greedy, beam = _engine_kwargs("m", "float32", 1024, 0), _engine_kwargs("m", "float32", 1024, 0, beams=3)
    assert "enable_prefix_caching" not in greedy and "block_size" not in greedy  # greedy keeps vLLM's defaults
    assert beam["enable_prefix_caching"] is True
    assert beam.get("block_size") == (None if torch.cuda.is_available() else CPU_PREFIX_BLOCK)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_beam_answers_are_the_fp_models_continuations(embedded_model_dir, questions):
    """The vLLM answer engine's beam search (Table 5) returns only the answer's tokens, from a real engine.
    (Its greedy path is `vllm_greedy`'s, checked against the fp32 model in test_vllm_w4.py.)"""
    from qdpo_ray.config import ModelConfig
    from qdpo_ray.data import format_prompt
    from qdpo_ray.evaluate.answers import vllm_generator
    from qdpo_ray.models import load_model, load_tokenizer

    mc = ModelConfig(name=embedded_model_dir)
    model, tok = load_model(mc, dtype="float32"), load_tokenizer(mc)
    ids = [format_prompt(tok, [q["turns"][0]], mc) for q in questions]
    beams = vllm_generator(embedded_model_dir, 12, num_beams=3)(ids)
    assert len(beams) == len(ids)
    for p, b in zip(ids, beams):
        assert 0 < len(b) <= 12  # the prompt is not part of the answer
        with torch.no_grad():
            first = model(torch.tensor([p])).logits[0, -1].topk(6).indices.tolist()
        assert b[0] in first  # a beam of width 3 starts from one of the 2 × 3 best first tokens


def test_vllm_answer_engine_refuses_a_lora_adapter_before_any_work(tmp_path):
    from qdpo_ray.evaluate.compare import run_evaluate

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cfg = load_config("configs/evaluate_judge.yaml", [f"out={tmp_path / 'ev'}", "evaluate.judge.answer_engine=vllm",
                                                      f"evaluate.models={{\"lora\": \"{adapter}\"}}"])
    with pytest.raises(ConfigError, match=r"evaluate\.models\.lora.*answer_engine=transformers"):
        run_evaluate(cfg)
    assert not (tmp_path / "ev").exists()


def test_evaluate_generates_answers_judges_and_resumes(fake, tiny_model_dir, tmp_path):
    from qdpo_ray.evaluate.compare import results_table, run_evaluate

    srv = fake(prefer("zzz-never"))  # prefers B in every order: position-biased, so ties under both rules
    over = [f"out={tmp_path / 'ev'}", f"model.name={tiny_model_dir}", "prompts.source=builtin:eval", "prompts.limit=2",
            "flips.max_new_tokens=4", "evaluate.perplexity_texts=2", f"evaluate.judge.base_url={srv.url}",
            "evaluate.judge.questions_limit=1", "evaluate.judge.answer_max_new_tokens=4", "evaluate.judge.backoff_s=0"]
    cfg = load_config("configs/evaluate_judge.yaml", over)
    rep = run_evaluate(cfg)
    assert srv.count == 1 * 2 * 2 + 1 * 2 * 2  # pairwise rtn vs fp: 2 turns × 2 orders; single: 2 models × 2 turns
    rtn = rep["models"]["rtn"]
    assert rtn["judge_wtl"] == [0, 2, 0] and rtn["judge_lose_rate"] == 0.0 and rtn["judge_single"] == 7.0
    assert 0.0 <= rtn["mtbench_rouge_l"] <= 1.0  # its MT-Bench answers against fp's
    assert rep["models"]["fp"]["judge_single"] == 7.0 and rep["judge"]["judge_model"] == "gpt-4"  # the config's name, sent to this server
    out = tmp_path / "ev"
    for label in ("fp", "rtn"):
        rows = [json.loads(x) for x in (out / "answers" / f"{label}.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [81] and len(rows[0]["turns"]) == 2
    assert {"judge.json", "judge.md", "judge.png"} <= {p.name for p in (out / "judge").iterdir()}
    assert "judge lose-rate" in results_table(rep) and json.loads((out / "results.json").read_text())["judge"]
    # The same evaluation again: answers read back, every judgment from the cache, no request.
    stamp = (out / "answers" / "rtn.jsonl").stat().st_mtime_ns
    rep2 = run_evaluate(cfg)
    assert srv.count == 8 and (out / "answers" / "rtn.jsonl").stat().st_mtime_ns == stamp
    assert rep2["models"]["rtn"]["judge_wtl"] == [0, 2, 0]
    # Other generation settings are other answers: regenerated and judged anew.
    run_evaluate(load_config("configs/evaluate_judge.yaml", over + ["evaluate.judge.answer_max_new_tokens=3"]))
    assert srv.count == 16 and (out / "answers" / "rtn.jsonl").stat().st_mtime_ns != stamp
