"""`/compare`: one prompt greedy-decoded by the fp and the W4 model, and where the two answers part.

Pure functions over the two engines' OpenAI chat responses (vLLM's `return_token_ids` and
`top_logprobs=2` extensions), so the maths is tested without engines.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qdpo_ray.generate.pairs import first_divergence
from qdpo_ray.text_metrics import rouge_l


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class CompareRequest(BaseModel):
    """Either `prompt` (one user turn) or `messages`; both models decode it greedily."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="One user message.")
    messages: list[ChatMessage] | None = Field(None, description="A chat; the models answer its last turn.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens per answer (default: serve.compare_max_tokens).")

    @model_validator(mode="after")
    def _one_input(self) -> "CompareRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        if self.prompt is not None:
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump() for m in self.messages or []]


def side_from_chat(resp: Any, model: str, latency_s: float) -> dict[str, Any]:
    """One model's answer: text, token ids, per-token text and top-1/top-2 log-prob gap, speed."""
    choice = resp.choices[0]
    content = (choice.logprobs.content if choice.logprobs is not None else None) or []
    gaps: list[float | None] = []
    for step in content:
        lps = sorted((t.logprob for t in step.top_logprobs or []), reverse=True)
        gaps.append(float(lps[0] - lps[1]) if len(lps) >= 2 else None)
    token_ids = list(choice.token_ids or [])
    n = resp.usage.completion_tokens if resp.usage is not None else len(token_ids)
    return {
        "model": model,
        "text": choice.message.content or "",
        "token_ids": token_ids,
        "tokens": [step.token for step in content],
        "top2_gaps": gaps,
        "finish_reason": choice.finish_reason,
        "completion_tokens": n,
        "prompt_tokens": resp.usage.prompt_tokens if resp.usage is not None else None,
        "latency_s": latency_s,
        "tokens_per_s": n / latency_s if latency_s > 0 else None,
    }


def compare_sides(fp: dict[str, Any], w4: dict[str, Any]) -> dict[str, Any]:
    """Where the W4 answer leaves the fp one, how close the fp model was to flipping there, ROUGE-L."""
    d = first_divergence(fp["token_ids"], w4["token_ids"])
    divergence = None
    if d is not None:
        def tok(side):
            if d >= len(side["token_ids"]):
                return None  # this answer ended before the other one
            text = side["tokens"][d] if d < len(side["tokens"]) else None
            return {"id": side["token_ids"][d], "text": text}
        divergence = {"index": d, "fp_token": tok(fp), "w4_token": tok(w4),
                      "fp_gap": fp["top2_gaps"][d] if d < len(fp["top2_gaps"]) else None}
    return {
        "fp": fp,
        "w4": w4,
        "identical": d is None,
        "first_divergence": d,
        "divergence": divergence,
        "rouge_l": rouge_l(w4["text"], fp["text"]),
    }
