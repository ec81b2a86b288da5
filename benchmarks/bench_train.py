"""One QDPO training step: STE fake-quant policy vs the same step on a plain (unquantized) policy.

    python benchmarks/bench_train.py [--model smollm2-135m] [--pairs 8] [--steps 3]

Single process, fp32, AdamW, the project's loss and batching; real model, synthetic token pairs of fixed
lengths (64-token prompts and answers) so both variants process identical tensors. Prints tokens/s and
peak RSS of each and the fake-quant overhead ratio, measured side by side in one run.
(The comparison with TRL's DPOTrainer asked for in the training issue is not in this script yet.)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--len", type=int, default=64)
    a = ap.parse_args()

    from qdpo_ray.config import QuantConfig
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import to_fake_quant
    from qdpo_ray.train.batch import collate

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt_token_ids": torch.randint(10, 40000, (a.len,), generator=g).tolist(),
             "chosen_token_ids": torch.randint(10, 40000, (a.len,), generator=g).tolist(),
             "rejected_token_ids": torch.randint(10, 40000, (a.len,), generator=g).tolist()} for _ in range(a.pairs)]
    batch = collate(rows)
    tokens = int(batch["attention_mask"].sum())
    ref = torch.zeros(a.pairs, dtype=torch.float64)
    res = {"pairs": a.pairs, "tokens_per_step": tokens, "threads": torch.get_num_threads()}
    for label in ("plain", "fake_quant"):
        model = load_model(a.model, dtype="float32").train()
        if label == "fake_quant":
            model = to_fake_quant(model, QuantConfig(bits=4))
        s = step_time(model, batch, ref, ref, a.steps)
        res[label] = {"step_s": s, "tokens_per_s": tokens / s,
                      "peak_rss_gb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        print(label, json.dumps(res[label]), flush=True)
        del model
    res["fake_quant_overhead"] = res["fake_quant"]["step_s"] / res["plain"]["step_s"]
    print("\nRESULT", json.dumps(res, indent=2))
    print(f"fake-quant step / plain step: {res['fake_quant_overhead']:.2f}x")


if __name__ == "__main__":
    main()
