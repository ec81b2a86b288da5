"""One QDPO training step: this project's step vs TRL's DPOTrainer, and fake-quant vs plain.

    python benchmarks/bench_train.py [--model smollm2-135m] [--pairs 8] [--steps 3]

Three variants, each in a fresh process (so peak RSS is its own), same model, same batch of synthetic
token pairs (64-token prompts and answers), fp32, AdamW, precomputed reference log-probs:
  qdpo_plain       the project's step (loss, batching) on an unquantized policy
  qdpo_fake_quant  the same step on the STE fake-quant W4 policy (what `qdpo-ray train` runs per worker)
  trl_fake_quant   TRL's DPOTrainer on the same fake-quant policy (precompute_ref_log_probs=True)
Prints tokens/s and peak RSS of each and the ratios, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def step_time(model, batch, ref_c, ref_r, steps: int) -> float:
    from qdpo_ray.train.losses import preference_loss, sequence_logps

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    n = ref_c.shape[0]
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and is not counted
        t = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = sequence_logps(logits, batch["labels"], batch["mask"]).double()
        loss = preference_loss(lp[:n], lp[n:], ref_c, ref_r).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / steps


def _rows(pairs: int, length: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(10, 40000, (length,), generator=g).tolist(),
             "chosen_token_ids": torch.randint(10, 40000, (length,), generator=g).tolist(),
             "rejected_token_ids": torch.randint(10, 40000, (length,), generator=g).tolist()} for _ in range(pairs)]


def run_trl(model, tok, rows: list[dict], steps: int) -> tuple[float, int]:
    """TRL's DPOTrainer on text pairs decoded from the same ids; returns (step seconds, tokens per step)."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    # TRL 1.16 tokenizes text itself, so it gets the decoded pairs; its own token count is reported.
    texts = [{k: tok.decode(r[f"{k if k != 'prompt' else 'prompt'}_token_ids"]) for k in ("prompt", "chosen", "rejected")}
             for r in rows]
    tokens = sum(len(tok(t["prompt"] + t["chosen"]).input_ids) + len(tok(t["prompt"] + t["rejected"]).input_ids) + 2
                 for t in texts)
    ds = Dataset.from_list(texts * (steps + 1))
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows), max_steps=steps + 1,
                     learning_rate=1e-6, precompute_ref_log_probs=True, report_to=[], save_strategy="no",
                     use_cpu=True, beta=0.1, max_length=None, logging_steps=10**6, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return sum(times[1:]) / steps, tokens


def variant(name: str, a) -> dict:
    from qdpo_ray.config import QuantConfig
    from qdpo_ray.models import load_model, load_tokenizer
    from qdpo_ray.quant.fake_quant import to_fake_quant
    from qdpo_ray.train.batch import collate

    rows = _rows(a.pairs, a.len)
    batch = collate(rows)
    tokens = int(batch["attention_mask"].sum())
    model = load_model(a.model, dtype="float32").train()
    if name != "qdpo_plain":
        model = to_fake_quant(model, QuantConfig(bits=4))
    if name == "trl_fake_quant":
        s, tokens = run_trl(model, load_tokenizer(a.model), rows, a.steps)
    else:
        ref = torch.zeros(a.pairs, dtype=torch.float64)
        s = step_time(model, batch, ref, ref, a.steps)
    return {"step_s": s, "tokens_per_s": tokens / s, "tokens_per_step": tokens,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
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
    for name in ("qdpo_plain", "qdpo_fake_quant", "trl_fake_quant"):
        cmd = [sys.executable, __file__, "--variant", name, "--model", a.model, "--pairs", str(a.pairs),
               "--steps", str(a.steps), "--len", str(a.len)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("VARIANT ")]
        if not line:
            res[name] = {"error": out.stderr[-2000:]}
        else:
            res[name] = json.loads(line[0][8:])
        print(name, json.dumps(res[name])[:400], flush=True)
    ok = all("step_s" in res[k] for k in ("qdpo_plain", "qdpo_fake_quant"))
    if ok:
        res["fake_quant_overhead"] = res["qdpo_fake_quant"]["step_s"] / res["qdpo_plain"]["step_s"]
    if ok and "step_s" in res["trl_fake_quant"]:
        res["tokens_per_s_vs_trl"] = res["qdpo_fake_quant"]["tokens_per_s"] / res["trl_fake_quant"]["tokens_per_s"]
        res["peak_rss_vs_trl"] = res["qdpo_fake_quant"]["peak_rss_gb"] / res["trl_fake_quant"]["peak_rss_gb"]
    print("\nRESULT", json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
