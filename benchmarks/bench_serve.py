"""W4 vs fp through the Serve endpoint: decode tokens/s and latency at concurrency 1 and 8.

    python benchmarks/bench_serve.py                         # deploys the embedded model + its W4 RTN export
    python benchmarks/bench_serve.py --url http://HOST:8000  # an app already running (CPU or GPU node)
    python benchmarks/bench_serve.py --fp MODEL --w4 DIR --gpu   # deploy on a GPU node (1 GPU per engine)

Every request streams a greedy answer of exactly --max-tokens tokens (`ignore_eos`), so both models do
the same work. Per request: time to first token, decode rate (tokens after the first / time after the
first), end-to-end latency. Per (model, concurrency): p50/p95 latency, mean decode rate per request,
aggregate output tokens/s. The two models are measured alternately in the same run; ratios are W4/fp.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _one(client, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {"latency": end - t0, "ttft": first - t0, "tokens": n,
            "decode_tps": (n - 1) / (end - first) if n > 1 and end > first else 0.0}


async def _run(client, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p):
        async with sem:
            return await _one(client, model, p, max_tokens)

    t0 = time.perf_counter()
    rs = await asyncio.gather(*(guarded(p) for p in prompts))
    wall = time.perf_counter() - t0
    lat = [r["latency"] for r in rs]
    return {"model": model, "concurrency": concurrency, "requests": len(rs),
            "p50_s": statistics.median(lat), "p95_s": _pct(lat, 0.95),
            "ttft_p50_s": statistics.median(r["ttft"] for r in rs),
            "decode_tps": statistics.mean(r["decode_tps"] for r in rs),
            "throughput_tps": sum(r["tokens"] for r in rs) / wall}


async def bench(url: str, fp: str, w4: str, prompts: list[str], levels: list[int], max_tokens: int,
                api_key: str) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, timeout=900, max_retries=0)
    for m in (fp, w4):  # warm-up: first requests pay one-time costs
        await _run(client, m, prompts[:2], 2, 8)
    rows = []
    for c in levels:
        for m in (fp, w4):
            rows.append(await _run(client, m, prompts, c, max_tokens))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running app; default: deploy one locally")
    ap.add_argument("--fp", default=None, help="fp model to deploy (default: the embedded smollm2-135m)")
    ap.add_argument("--w4", default=None, help="W4 checkpoint to deploy (default: RTN export of --fp)")
    ap.add_argument("--gpu", action="store_true", help="deploy with one GPU per engine")
    ap.add_argument("--fp-name", default="fp16")
    ap.add_argument("--w4-name", default="w4")
    ap.add_argument("--requests", type=int, default=16, help="requests per (model, concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--out", default="runs/bench-serve")
    args = ap.parse_args()

    from qdpo_ray.config import PromptsConfig, load_config
    from qdpo_ray.data import load_prompts

    prompts = load_prompts(PromptsConfig(source="builtin:eval")).prompts
    prompts = (prompts * (args.requests // len(prompts) + 1))[: args.requests]
    url = args.url
    if url is None:
        from qdpo_ray.serve.app import start

        overrides = [f"out={args.out}", "serve.port=8000"]
        if args.fp:
            overrides.append(f"serve.fp_model={args.fp}")
        if args.w4:
            overrides.append(f"serve.w4_dir={args.w4}")
        if args.gpu:
            overrides.append("serve.engine.gpus_per_actor=1")
        cfg = load_config(None, overrides)
        t0 = time.time()
        start(cfg)
        print(f"deployed in {time.time() - t0:.0f} s")
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    key = os.environ.get("QDPO_API_KEY", "none")
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = asyncio.run(bench(url, args.fp_name, args.w4_name, prompts, levels, args.max_tokens, key))

    print(f"\n{args.requests} requests × {args.max_tokens} tokens per (model, concurrency), greedy, streamed")
    print(f"{'model':<6} {'conc':>4} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>9} {'decode tok/s/req':>17} {'total tok/s':>12}")
    for r in rows:
        print(f"{r['model']:<6} {r['concurrency']:>4} {r['p50_s']:>7.2f} {r['p95_s']:>7.2f} {r['ttft_p50_s']:>9.2f} "
              f"{r['decode_tps']:>17.1f} {r['throughput_tps']:>12.1f}")
    print("\nW4 / fp ratios")
    for c in levels:
        f, q = (next(r for r in rows if r["model"] == m and r["concurrency"] == c) for m in (args.fp_name, args.w4_name))
        print(f"  concurrency {c}: decode tok/s {q['decode_tps'] / f['decode_tps']:.2f}×, "
              f"total tok/s {q['throughput_tps'] / f['throughput_tps']:.2f}×, p50 latency {q['p50_s'] / f['p50_s']:.2f}×, "
              f"p95 latency {q['p95_s'] / f['p95_s']:.2f}×")


if __name__ == "__main__":
    main()
