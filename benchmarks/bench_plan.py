"""The planner's training memory against a real run: `qdpo-ray plan`'s per-worker estimate for a config
next to the `peak_mem_gb` (the worker's ru_maxrss) of a short `qdpo-ray train` of the same config.

    python benchmarks/bench_plan.py [--config configs/default.yaml] [--steps 2] [--out runs/bench-plan]

The pairs are synthetic at the config's maximum lengths (prompts of `train.max_prompt_len` token ids, answers
of `train.max_response_len`), the batch the planner sizes; everything else — model, objective, ZeRO stage,
precision, batch — is the config's. Two optimizer steps suffice: Adam's moments exist from the first
`step()` on, so the second step's peak holds every part the plan counts. Prints both numbers and the ratio.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch


def synthetic_pairs(path: Path, n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qdpo_ray.generate.pairs import _schema, make_pair

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
        c = torch.randint(10, vocab, (response_len,), generator=g).tolist()
        r = c[:2] + torch.randint(10, vocab, (response_len - 2,), generator=g).tolist()
        rows.append(make_pair({"id": f"b{i:04d}", "prompt_text": f"p{i}", "prompt_token_ids": p, "chosen": "c",
                               "rejected": "r", "chosen_token_ids": c, "rejected_token_ids": r,
                               "chosen_fp_gaps": [1.0] * response_len}))
    (path / "pairs").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), path / "pairs" / "part-00000.parquet")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-plan")
    args = ap.parse_args()

    from qdpo_ray.config import load_config
    from qdpo_ray.plan import run_plan
    from qdpo_ray.train.trainer import run_train

    out = Path(args.out).resolve()
    cfg = load_config(args.config)
    text, stages = run_plan(cfg)
    train = next(s for s in stages if s.stage == "train")
    estimate = train.gpu_gib if train.gpu_gib is not None else train.host_gib / cfg.train.num_workers
    t = cfg.train
    n = t.num_workers * t.per_device_batch_size * t.grad_accum * args.steps
    from qdpo_ray.plan import load_model_config

    vocab = load_model_config(cfg.model.name).get_text_config().vocab_size
    pairs = synthetic_pairs(out / "pairs", n, t.max_prompt_len, t.max_response_len, vocab)
    run_cfg = load_config(args.config, [f"out={out / 'train'}", f"train.pairs={pairs}", f"train.max_steps={args.steps}",
                                        "train.export=false", f"train.checkpoint_every={args.steps}"])
    run_train(run_cfg)
    with open(out / "train" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    measured = max(float(r["peak_mem_gb"]) for r in rows)
    print("\n".join(line for line in text.splitlines() if line.startswith("  ") or line.startswith("train")))
    peaks = ", ".join(f"{float(r['peak_mem_gb']):.2f}" for r in rows)
    print(f"\nper-step peak_mem_gb: {peaks}")
    print(f"planned {estimate:.2f} GiB per worker, measured {measured:.2f} GiB: "
          f"estimate / measured = {estimate / measured:.3f}")


if __name__ == "__main__":
    main()
