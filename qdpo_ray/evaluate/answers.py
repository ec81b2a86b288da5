"""MT-Bench answers of one model, for the judge (paper §5.2): both turns, greedy or beam search.

Turn 1 answers the first question; turn 2 sees the conversation so far — question 1, the model's *own*
answer to it, question 2 — as FastChat's `gen_model_answer` builds it. Token ids come from one of two
generators, chosen once per evaluation so that two models' answers differ by their weights only:

  transformers   fp32, in this process (the same path as the rest of `qdpo-ray evaluate`)
  vllm           one vLLM engine per model and turn, in a process of its own (several times faster on a CPU),
                 fp32 or fp16 as the pairs engines choose (`vllm_dtype`)
"""

from __future__ import annotations

from typing import Any, Callable

from qdpo_ray.config import ModelConfig
from qdpo_ray.data import format_prompt
from qdpo_ray.generate.hf import greedy_generate

Generate = Callable[[list[list[int]]], list[list[int]]]


def transformers_generator(model, tok, max_new_tokens: int, batch_size: int = 8, num_beams: int = 1) -> Generate:
    return lambda ids: greedy_generate(model, tok, ids, max_new_tokens, batch_size, num_beams=num_beams)


def vllm_dtype() -> str:
    """The answer engines' dtype, the pairs engines' `dtype: auto`: fp32 where π_q runs as its dense copy (a
    CPU without vLLM's W4A16 kernel: exact, and 2x faster there than emulated fp16), fp16 where the kernel
    runs it (AVX-512 CPUs, GPUs). One dtype for every model of an evaluation."""
    import torch

    from qdpo_ray.config import VllmEngineConfig
    from qdpo_ray.generate.engine import cpu_has_w4_kernel, resolve_dtype

    w4_engine = "packed" if torch.cuda.is_available() or cpu_has_w4_kernel() else "dense"
    return resolve_dtype(VllmEngineConfig(), w4_engine).dtype


def vllm_generator(model_dir: str, max_new_tokens: int, num_beams: int = 1) -> Generate:
    from qdpo_ray.generate.vllm_greedy import run_subprocess

    def generate(ids: list[list[int]]) -> list[list[int]]:
        # the engine's context must hold the longest conversation and its answer; vLLM rejects longer prompts
        longest = max(map(len, ids)) + max_new_tokens
        return run_subprocess(model_dir, ids, max_new_tokens, vllm_dtype(), beams=num_beams,
                              max_model_len=-(-longest // 256) * 256, timeout=3600)["token_ids"]

    return generate


def mtbench_answers(generate: Generate, tok, questions: list[dict[str, Any]], model_cfg: ModelConfig,
                    turns: int) -> dict[Any, list[str]]:
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
        out = generate(ids) if ids else []
        for q, a in zip(asked, out):
            answers[q["question_id"]].append(tok.decode(a, skip_special_tokens=True).strip())
    return answers
