"""Summed response log-probs of a causal LM for a `collate_shared` batch, without its [B, T, vocab] logits.

`add_response_logps(model)` gives a Hugging Face causal LM a second forward mode (as TRL's
`add_fused_lm_head` does): `model(input_ids=…, attention_mask=<4D>, position_ids=…, score_index=…,
score_labels=…, score_seq=…, num_sequences=2B)` runs the backbone once over the packed
`prompt + chosen + rejected` rows, keeps the hidden states of the scored (response) positions only —
prompt and padding logits are never used — and scores them through the LM head in chunks
(`losses.chunked_token_logps`, which recomputes each chunk's logits in backward). It returns log π(y|x)
per sequence, [2B] fp32 in `collate` order (chosen 0..B-1, rejected 0..B-1): the value
`sequence_logps(model(**collate(rows)).logits[:, :-1], labels, mask)` computes from the full logits.

The mode lives in the model's own `forward`, so a DeepSpeed engine (ZeRO-3 gathers parameters in module
hooks) and a peft wrapper (add the mode before `get_peft_model`) both pass it through. Models whose head
is not a plain `logits = lm_head(h)` (logit soft-capping or scaling, a quantized or LoRA head, ZeRO-3
partitioned weights) are scored through the head module instead, chunk by chunk under activation
checkpointing.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from qdpo_ray.train.losses import chunk_tokens, chunked_token_logps, token_logps

# Config fields that make `logits` something other than lm_head(hidden) (the ones TRL's fused head handles).
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")
SCORE_KEYS = ("score_index", "score_labels", "score_seq", "num_sequences")


def _plain_backbone_and_head(model) -> bool:
    cfg = model.config.get_text_config()
    return all(getattr(cfg, k, None) in (None, 1.0) for k in _HEAD_TRANSFORMS) and \
        getattr(model, "base_model", model) is not model and model.get_output_embeddings() is not None


def _head_chunk_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_logps(head(hidden).unsqueeze(0), labels.unsqueeze(0))[0]


def _module_head_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Chunks through the head *module* (its hooks run: ZeRO-3 gathering, LoRA or fake-quant on the head),
    each under activation checkpointing so that its logits are recomputed in backward, not kept."""
    from torch.utils.checkpoint import checkpoint

    step = chunk_tokens(vocab)
    outs = []
    for s in range(0, hidden.shape[0], step):
        h, y = hidden[s:s + step], labels[s:s + step]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(_head_chunk_logps, head, h, y, use_reentrant=False))
        else:
            outs.append(_head_chunk_logps(head, h, y))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()


def head_token_logps(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[i] | hidden[i]) through `model`'s LM head: hidden [N, H], labels [N] → [N] fp32."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and not hasattr(head.weight, "ds_id"):  # plain, not ZeRO-3-partitioned
        return chunked_token_logps(hidden, head.weight, head.bias, labels)
    return _module_head_logps(head, hidden, labels.clamp(min=0), model.config.get_text_config().vocab_size)


def _sum_per_sequence(tok: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, seq, tok)


def _response_forward(self, *args, score_index: torch.Tensor | None = None, score_labels: torch.Tensor | None = None,
                      score_seq: torch.Tensor | None = None, num_sequences: int | None = None, **kwargs):
    if score_index is None:
        return self._qdpo_original_forward(*args, **kwargs)
    check_sdpa(self)
    # peft passes labels/return_dict/output_* as None; neither path takes labels
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "labels"}
    kwargs["use_cache"] = False
    if _plain_backbone_and_head(self):
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_index)
        tok = head_token_logps(self, hidden, score_labels)
    else:  # full logits from the model's own forward, then the scored rows
        logits = self._qdpo_original_forward(*args, **kwargs).logits
        tok = token_logps(logits.reshape(1, -1, logits.shape[-1])[:, score_index], score_labels.unsqueeze(0))[0]
    return _sum_per_sequence(tok, score_seq, int(num_sequences))


def check_sdpa(model) -> None:
    """The packed batches' 4D boolean mask means "True = attend" to SDPA only: eager attention would add
    it to the scores and flash-attention ignores it, both silently giving wrong log-probs."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise ValueError(f"response log-probs need attn_implementation='sdpa' (the prompt-shared batches use a "
                         f"4D boolean mask), but the model uses {impl!r}; load it with "
                         "attn_implementation='sdpa' (qdpo_ray.models.load_model does for training)")


def add_response_logps(model):
    """Add the response-log-prob forward mode to a HF causal LM (in place; idempotent); returns the model."""
    if getattr(model, "_qdpo_original_forward", None) is None:
        model._qdpo_original_forward = model.forward
        model.forward = types.MethodType(_response_forward, model)
    return model


def response_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(y|x) per sequence of a `batch.collate_shared` batch, [2B] fp32 (chosen then rejected)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], score_index=batch["score_index"],
                 score_labels=batch["score_labels"], score_seq=batch["score_seq"],
                 num_sequences=int(batch["response_len"].shape[0]))
