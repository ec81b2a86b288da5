"""MT-Bench answers of one model, for the judge (paper §5.2): both turns, greedy or beam search.

Turn 1 answers the first question; turn 2 sees the conversation so far — question 1, the model's *own*
answer to it, question 2 — as FastChat's `gen_model_answer` builds it. Generation is fp32 transformers, the
same path as the rest of `qdpo-ray evaluate`, so two models' answers differ by their weights only.
"""

from __future__ import annotations

from typing import Any

from qdpo_ray.config import ModelConfig
from qdpo_ray.data import format_prompt
from qdpo_ray.generate.hf import greedy_generate


def mtbench_answers(model, tok, questions: list[dict[str, Any]], model_cfg: ModelConfig, turns: int,
                    max_new_tokens: int, batch_size: int = 8, num_beams: int = 1) -> dict[Any, list[str]]:
    """{question_id: [answer to turn 1, answer to turn 2][:turns]} for MT-Bench-format `questions`."""
    answers: dict[Any, list[str]] = {q["question_id"]: [] for q in questions}
    for t in range(turns):
        asked = [q for q in questions if len(q["turns"]) > t]
        conversations = []
        for q in asked:
            convo: list[str] = []
            for i in range(t):
                convo += [q["turns"][i], answers[q["question_id"]][i]]
            conversations.append(convo + [q["turns"][t]])
        ids = [format_prompt(tok, c, model_cfg) for c in conversations]
        out = greedy_generate(model, tok, ids, max_new_tokens, batch_size, num_beams=num_beams) if ids else []
        for q, a in zip(asked, out):
            answers[q["question_id"]].append(tok.decode(a, skip_special_tokens=True).strip())
    return answers
