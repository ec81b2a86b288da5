"""Prompt sources: the project's sets, MT-Bench, JSONL/JSON/Parquet, HH conversations, clear errors."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qdpo_ray.config import ConfigError, ModelConfig, PromptsConfig
from qdpo_ray.data import format_prompt, hh_first_human_turn, load_prompts


def test_builtin_sets_are_disjoint_and_sized():
    train = load_prompts(PromptsConfig(source="builtin:train"))
    ev = load_prompts(PromptsConfig(source="builtin:eval"))
    assert len(train) >= 300 and len(ev) >= 50
    assert not {p.lower() for p in train.prompts} & {p.lower() for p in ev.prompts}
    assert len({r["category"] for r in ev.rows}) >= 5


def _words(text):
    return re.findall(r"\w+", text.lower())


def _ngrams(text, n=8):
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _raw(name):
    path = Path(__file__).resolve().parent.parent / "qdpo_ray" / "prompts" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_builtin_train_is_large_unique_and_disjoint_from_eval():
    train = load_prompts(PromptsConfig(source="builtin:train"))
    ev = load_prompts(PromptsConfig(source="builtin:eval"))
    assert len(train) >= 2000
    raw = _raw("train")
    assert len(raw) == len(train)  # nothing empty or skipped
    assert len({r["id"] for r in raw}) == len(raw)
    norm = lambda p: " ".join(p.lower().split())  # noqa: E731
    assert len({norm(p) for p in train.prompts}) == len(train)  # no duplicate prompts either
    assert not {norm(p) for p in train.prompts} & {norm(p) for p in ev.prompts}
    eval_grams = set().union(*(_ngrams(p) for p in ev.prompts))
    shared = [(p, g) for p in train.prompts for g in _ngrams(p) if g in eval_grams]
    assert not shared, shared[:3]


def test_builtin_train_keeps_handwritten_rows_first_and_covers_the_eval_kinds():
    raw = _raw("train")
    assert [r["id"] for r in raw[:400]] == [f"train-{i:04d}" for i in range(1, 401)]
    assert {r["kind"] for r in raw[:400]} == {"handwritten"}
    kinds = Counter(r["kind"] for r in raw)
    for kind in ("explanation", "list", "advice", "instruction", "rewrite", "math-word-problem", "code", "follow-up",
                 "creative", "roleplay", "reasoning", "extraction", "summarization"):
        assert kinds[kind] >= 100, kinds
    eval_cats = {r["category"] for r in _raw("eval")}
    cats = Counter(r["category"] for r in raw)
    assert set(cats) == eval_cats and min(cats.values()) >= 100, cats
    # short enough for the default max_prompt_len; the composed rows all under 400 characters
    assert max(len(r["prompt"]) for r in raw[400:]) < 400
    # a prefix mixes kinds (the composed rows are shuffled), so `prompts.limit` still samples all of them
    assert len({r["kind"] for r in raw[400:700]}) == len(kinds) - 1


def test_train_prompts_script_reproduces_the_file():
    path = Path(__file__).resolve().parent.parent / "scripts" / "make_train_prompts.py"
    spec = importlib.util.spec_from_file_location("make_train_prompts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.dumps(mod.build()) == mod.TRAIN.read_text(encoding="utf-8"), \
        "qdpo_ray/prompts/train.jsonl is stale: run python scripts/make_train_prompts.py"


def test_mtbench_first_turns():
    ps = load_prompts(PromptsConfig(source="mtbench"))
    assert len(ps) == 80
    assert ps.rows[0]["id"] == "81" and ps.rows[0]["category"] == "writing"


def test_jsonl_json_parquet_and_dir(tmp_path):
    rows = [{"id": "a", "text": "Hello?"}, {"id": "b", "text": "  "}, {"id": "c", "text": "Why?"}]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "p.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for src in ("d/p.jsonl", "p.json", "p.parquet", "d"):
        ps = load_prompts(PromptsConfig(source=str(tmp_path / src), column="text"))
        assert ps.prompts == ["Hello?", "Why?"] and ps.skipped_empty == 1
        assert [r["id"] for r in ps.rows] == ["a", "c"]
    assert len(load_prompts(PromptsConfig(source=str(tmp_path / "p.json"), column="text", limit=1))) == 1


def test_hh_conversation_takes_first_human_turn(tmp_path):
    conv = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour...\n\nHuman: And then?\n\nAssistant: Bake."
    assert hh_first_human_turn(conv) == "How do I bake bread?"
    (tmp_path / "hh.jsonl").write_text(json.dumps({"chosen": conv, "rejected": conv}) + "\n")
    assert load_prompts(PromptsConfig(source=str(tmp_path / "hh.jsonl"))).prompts == ["How do I bake bread?"]


@pytest.mark.parametrize("content,cfg,expect", [
    ('{"q": "x"}\n', {"column": "prompt"}, r"prompts.column='prompt' not found .*\['q'\]"),
    ('{"prompt": "x"}\nnot json\n', {}, r"line 2 is not valid JSON"),
    ('{"prompt": ""}\n', {}, r"yielded no non-empty prompts"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', {}, r"duplicate id '1'"),
])
def test_bad_sources_name_the_problem(tmp_path, content, cfg, expect):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError, match=expect):
        load_prompts(PromptsConfig(source=str(f), **cfg))


def test_unknown_sources():
    with pytest.raises(ConfigError, match="unknown built-in set"):
        load_prompts(PromptsConfig(source="builtin:nope"))
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_prompts(PromptsConfig(source=__file__))


@pytest.mark.slow
def test_chat_template_formatting(embedded_model_dir):
    from qdpo_ray.models import load_tokenizer

    tok = load_tokenizer(embedded_model_dir)
    ids = format_prompt(tok, "Hi there", ModelConfig(name=embedded_model_dir))
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    raw = format_prompt(tok, "Hi there", ModelConfig(name=embedded_model_dir, chat_template=False))
    assert tok.decode(raw) == "Hi there"
    sys_ids = format_prompt(tok, "Hi", ModelConfig(name=embedded_model_dir, system_prompt="Be brief."))
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tok.decode(sys_ids)
