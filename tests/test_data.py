"""Prompt sources: the project's sets, MT-Bench, JSONL/JSON/Parquet, HH conversations, clear errors."""

import json

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
