"""One QDPO training step: this project's step vs TRL's DPOTrainer, and fake-quant vs plain.

    python benchmarks/bench_train.py [--model smollm2-135m] [--pairs 8] [--steps 3] [--variants a,b,...]

Each variant runs in a fresh process (so peak RSS is its own) on the same model and the same batch:
`--pairs` synthetic pairs of `--len`-token prompts and answers (+ EOS), made of whole-word tokens so that
TRL, which tokenizes text itself, gets exactly the same token ids (checked). fp32, AdamW (lr 1e-6, no
weight decay), gradient clipping at 1.0, β = 0.1, reference log-probs precomputed before training.
  qdpo_plain        the project's worker step (`build_policy` + `preference_micro_step`) on an
                    unquantized policy
  qdpo_fake_quant   the same step on the STE fake-quant W4 policy (what `qdpo-ray train` runs per worker)
  trl_fake_quant    TRL's DPOTrainer on the same fake-quant policy, TRL's defaults (fused AdamW, fused
                    chunked LM head, gradient checkpointing) except fp32 (DPOConfig defaults to bf16)
Extra variants (--variants): qdpo_lora_fake_quant (QDPO + LoRA, paper Table 7: the base frozen as its
RTN weights Q(W), r = α = 64 adapters on every Linear trained), qdpo_fake_quant_deepspeed (our step
inside the worker's DeepSpeed ZeRO-2 engine, one process), trl_fake_quant_no_gc (TRL with gradient_checkpointing=False),
full_logits_fake_quant (the step before this benchmark's changes: full logits, foreach AdamW).
Tokens per step are the pairs' tokens (2 × prompt + chosen + rejected) for every variant, so the
tokens/s ratio is the inverse step-time ratio. Prints each variant and the ratios, side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def step_time(model, batch, steps: int) -> float:
    """The worker's micro-step (`steps.preference_micro_step`: prompt-shared rows, response-only chunked
    LM head, eq. 5), its optimizer (`worker.make_optimizer`: AdamW) and gradient clipping at
    max_grad_norm, as DeepSpeed applies it in `qdpo-ray train`."""
    from qdpo_ray.config import TrainConfig
    from qdpo_ray.train.steps import preference_micro_step
    from qdpo_ray.train.worker import make_optimizer

    t = TrainConfig(lr=1e-6, beta=0.1, max_grad_norm=1.0, weight_decay=0.0)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], t)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and is not counted
        t0 = time.perf_counter()
        loss, _ = preference_micro_step(model, batch, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def step_time_deepspeed(model, batch, steps: int) -> float:
    """The same micro-step inside the worker's DeepSpeed engine (`worker.deepspeed_config`: ZeRO-2, fp32,
    gradient clipping), one process (gloo, world size 1) instead of a Ray Train worker."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("BENCH_PORT", "29531"),
                       "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    import deepspeed
    import torch.distributed as dist

    from qdpo_ray.config import TrainConfig
    from qdpo_ray.train.steps import preference_micro_step
    from qdpo_ray.train.worker import deepspeed_config as _deepspeed_config, make_optimizer

    dist.init_process_group("gloo")
    t = TrainConfig(lr=1e-6, beta=0.1, max_grad_norm=1.0, weight_decay=0.0,
                    per_device_batch_size=batch["ref_chosen"].shape[0])
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], t)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_deepspeed_config(t), dist_init_required=False)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = preference_micro_step(engine, batch, t)
        engine.backward(loss.float())
        engine.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def step_time_full_logits(model, batch, steps: int) -> float:
    """The step before the response-only head (for comparison): full [2B, T, vocab] logits, log-probs
    from them, torch's default (foreach) AdamW, no clipping."""
    from qdpo_ray.train.losses import preference_loss, sequence_logps

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    n = batch["ref_chosen"].shape[0]
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = sequence_logps(logits, batch["labels"], batch["mask"]).double()
        loss = preference_loss(lp[:n], lp[n:], batch["ref_chosen"], batch["ref_rejected"]).loss
        del logits
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def _word_ids(tok) -> list[int]:
    """Token ids that are whole space-prefixed lowercase words: any sequence of them decodes to a text that
    the tokenizer maps back to exactly these ids, so TRL (which tokenizes text itself) sees our batch."""
    import re

    out = []
    for i in range(10, min(len(tok), 40000)):
        s = tok.decode([i])
        if re.fullmatch(r" [a-z]{3,}", s) and tok(s, add_special_tokens=False).input_ids == [i]:
            out.append(i)
    return out


def _rows(tok, pairs: int, length: int) -> list[dict]:
    """Synthetic pairs: `length` random words of prompt, chosen and rejected answers, each answer ended by
    EOS (as TRL appends it)."""
    words = torch.tensor(_word_ids(tok))
    g = torch.Generator().manual_seed(0)

    def draw() -> list[int]:
        return words[torch.randint(0, len(words), (length,), generator=g)].tolist()

    eos = [tok.eos_token_id]
    return [{"prompt_token_ids": draw(), "chosen_token_ids": draw() + eos, "rejected_token_ids": draw() + eos}
            for _ in range(pairs)]


def run_trl(model, tok, rows: list[dict], steps: int, gradient_checkpointing: bool) -> tuple[float, int]:
    """TRL's DPOTrainer on the same pairs as text; returns (step seconds, tokens per step)."""
    import tempfile

    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()  # TRL caches reference log-probs by dataset + weights hash; compute them here
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    texts = [{"prompt": tok.decode(r["prompt_token_ids"]), "chosen": tok.decode(r["chosen_token_ids"]),
              "rejected": tok.decode(r["rejected_token_ids"])} for r in rows]
    ds = datasets.Dataset.from_list(texts * (steps + 1))
    # TRL's defaults (adamw_torch_fused, lr schedule, max_grad_norm=1.0, weight_decay=0, fused chunked LM head,
    # gradient_checkpointing=True) except: fp32 like our step (DPOConfig defaults to bf16 autocast), and the
    # same lr/β/batch; reference log-probs precomputed before training as ours are.
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows), max_steps=steps + 1,
                     learning_rate=1e-6, beta=0.1, precompute_ref_log_probs=True, bf16=False,
                     gradient_checkpointing=gradient_checkpointing, max_length=None, use_cpu=True, report_to=[],
                     save_strategy="no", logging_steps=10**6, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    first = trainer.train_dataset[0]
    same = (first["prompt_ids"], first["chosen_ids"], first["rejected_ids"]) == (
        rows[0]["prompt_token_ids"], rows[0]["chosen_token_ids"], rows[0]["rejected_token_ids"])
    if not same:
        raise RuntimeError("TRL tokenized the pairs differently from our ids; the batches would differ")
    trainer.train()
    tokens = sum(2 * len(r["prompt_token_ids"]) + len(r["chosen_token_ids"]) + len(r["rejected_token_ids"]) for r in rows)
    return sum(times[1:]) / steps, tokens


VARIANTS = ("qdpo_plain", "qdpo_fake_quant", "trl_fake_quant")
EXTRA = ("qdpo_lora_fake_quant", "qdpo_fake_quant_deepspeed", "trl_fake_quant_no_gc", "full_logits_fake_quant")


def variant(name: str, a) -> dict:
    from qdpo_ray.config import ModelConfig, QuantConfig, RunConfig
    from qdpo_ray.models import load_model, load_tokenizer
    from qdpo_ray.quant.fake_quant import to_fake_quant
    from qdpo_ray.train.batch import collate, collate_shared
    from qdpo_ray.train.worker import build_policy

    tok = load_tokenizer(a.model)
    rows = _rows(tok, a.pairs, a.len)
    for r in rows:
        r["ref_chosen_logps"] = r["ref_rejected_logps"] = 0.0
    # the same count for every variant: the tokens of the pairs (2 × prompt + chosen + rejected)
    tokens = sum(2 * len(r["prompt_token_ids"]) + len(r["chosen_token_ids"]) + len(r["rejected_token_ids"]) for r in rows)
    if name.startswith("qdpo_"):
        # exactly the worker's policy (`qdpo-ray train`): fake-quant (or not), response-log-prob mode,
        # selective activation checkpointing
        cfg = RunConfig(model=ModelConfig(name=a.model), quant=QuantConfig(bits=16 if name == "qdpo_plain" else 4),
                        train={"lora": {"enabled": name == "qdpo_lora_fake_quant"}})
        policy, batch = build_policy(cfg).train(), collate_shared(rows, pad_id=tok.pad_token_id)
        if name.endswith("_deepspeed"):
            s = step_time_deepspeed(policy, batch, a.steps)
        else:
            s = step_time(policy, batch, a.steps)
    else:
        model = load_model(a.model, dtype="float32").train()
        model.config.use_cache = False
        model = to_fake_quant(model, QuantConfig(bits=4))
        if name == "full_logits_fake_quant":
            s = step_time_full_logits(model, collate(rows, pad_id=tok.pad_token_id), a.steps)
        else:
            s, trl_tokens = run_trl(model, tok, rows, a.steps, gradient_checkpointing=not name.endswith("_no_gc"))
            assert trl_tokens == tokens
        policy = model
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {"step_s": s, "tokens_per_s": tokens / s, "tokens_per_step": tokens, "trainable_params": trainable,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, run in this order; also: {', '.join(EXTRA)}")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--len", type=int, default=64)
    a = ap.parse_args()

    if a.variant:
        print("VARIANT", json.dumps(variant(a.variant, a)))
        return
    import subprocess
    import sys

    res = {"pairs": a.pairs, "len": a.len, "steps": a.steps, "threads": torch.get_num_threads()}
    for name in a.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", name, "--model", a.model, "--pairs", str(a.pairs),
               "--steps", str(a.steps), "--len", str(a.len)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("VARIANT ")]
        if not line:
            res[name] = {"error": out.stderr[-2000:]}
        else:
            res[name] = json.loads(line[0][8:])
        print(name, json.dumps(res[name])[:400], flush=True)

    def ok(k: str) -> bool:
        return "step_s" in res.get(k, {})

    if ok("qdpo_plain") and ok("qdpo_fake_quant"):
        res["fake_quant_overhead"] = res["qdpo_fake_quant"]["step_s"] / res["qdpo_plain"]["step_s"]
    for trl in ("trl_fake_quant", "trl_fake_quant_no_gc", "full_logits_fake_quant"):  # ours vs each
        if ok("qdpo_fake_quant") and ok(trl):
            suffix = {"trl_fake_quant": "trl"}.get(trl, trl)
            res[f"tokens_per_s_vs_{suffix}"] = res["qdpo_fake_quant"]["tokens_per_s"] / res[trl]["tokens_per_s"]
            res[f"peak_rss_vs_{suffix}"] = res["qdpo_fake_quant"]["peak_rss_gb"] / res[trl]["peak_rss_gb"]
    if ok("qdpo_fake_quant") and ok("qdpo_lora_fake_quant"):  # paper Table 7: LoRA against full QDPO
        full, lora = res["qdpo_fake_quant"], res["qdpo_lora_fake_quant"]
        res["lora_trainable_params_vs_full"] = lora["trainable_params"] / full["trainable_params"]
        res["lora_peak_rss_vs_full"] = lora["peak_rss_gb"] / full["peak_rss_gb"]
        res["lora_tokens_per_s_vs_full"] = lora["tokens_per_s"] / full["tokens_per_s"]
    print("\nRESULT", json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
