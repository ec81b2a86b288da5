"""Torch-level checks of the GPU path that CI (CPU-only) cannot run. Needs torch with CUDA only:

    python scripts/gpu_check.py            # prints one line per check, exits 1 if any failed

1. the training loop's metric reduction under NCCL (a CPU tensor there fails at step 1);
2. RTN fake-quant on CUDA gives the same integers as on CPU, and the STE passes gradients unchanged;
3. the chunked response-only LM head equals full-logit log-probs on CUDA (fp32 and bf16), and its
   gradients match;
4. the objective mixes (qdpo+kd, qdpo+sft) give the same loss and gradients on CUDA as on CPU;
5. a fake-quant step's speed against a plain Linear step (one layer, 7B-sized), for docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS: list[tuple[str, bool, str]] = []


def check(name):
    def wrap(fn):
        try:
            detail = fn() or ""
            RESULTS.append((name, True, detail))
        except Exception as e:  # report and go on: one run should show every check
            RESULTS.append((name, False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        return fn
    return wrap


@check("nccl: metrics reduce on the worker's device")
def _nccl():
    import torch.distributed as dist

    from qdpo_ray.train.distributed import reduce_step_metrics

    d = tempfile.mkdtemp()
    dist.init_process_group("nccl", init_method=f"file://{d}/pg", rank=0, world_size=1)
    try:
        got = reduce_step_metrics([1.0, 2.5], torch.device("cuda:0"))
        assert got == [1.0, 2.5], got
        try:  # what the old code did: a CPU tensor through NCCL
            dist.all_reduce(torch.tensor([1.0], dtype=torch.float64))
            old = "CPU tensor under NCCL did NOT fail"
        except Exception as e:
            old = f"CPU tensor under NCCL fails as expected: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        dist.destroy_process_group()
    return f"cuda tensor reduced ok; {old}"


@check("fake-quant: CUDA integers == CPU integers, STE gradient is identity")
def _fq():
    from qdpo_ray.quant.fake_quant import _STEFakeQuant
    from qdpo_ray.quant.rtn import QuantSpec, compute_qparams, quantize

    torch.manual_seed(0)
    w = torch.randn(4096, 4096) * 0.02
    out = []
    for spec in (QuantSpec(4), QuantSpec(4, group_size=128), QuantSpec(8), QuantSpec(4, symmetric=True)):
        qc = quantize(w, *compute_qparams(w, spec), spec)
        wg = w.cuda()
        qg = quantize(wg, *compute_qparams(wg, spec), spec).cpu()
        diff = int((qc != qg).sum())
        assert diff == 0, f"{spec}: {diff} codes differ"
        wp = wg.clone().requires_grad_(True)
        y = _STEFakeQuant.apply(wp, spec, None, None)
        g = torch.randn_like(y)
        y.backward(g)
        assert torch.equal(wp.grad, g)
        out.append(f"b{spec.bits}g{spec.group_size or 'ch'}{'s' if spec.symmetric else ''}")
    return "identical codes for " + ", ".join(out)


@check("chunked LM head == full logits on CUDA (fp32, bf16), gradients too")
def _head():
    from qdpo_ray.train.losses import chunked_token_logps, token_logps

    torch.manual_seed(0)
    msgs = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        h = (torch.randn(700, 1024, device="cuda") * 0.5).to(dtype).requires_grad_(True)
        wt = (torch.randn(32000, 1024, device="cuda") * 0.02).to(dtype).requires_grad_(True)
        y = torch.randint(0, 32000, (700,), device="cuda")
        a = chunked_token_logps(h, wt, None, y, chunk=256)
        (ga_h, ga_w) = torch.autograd.grad(a.sum(), (h, wt))
        b = token_logps((h @ wt.t()).unsqueeze(0), y.unsqueeze(0))[0]
        (gb_h, gb_w) = torch.autograd.grad(b.sum(), (h, wt))
        e = (a - b).abs().max().item()
        eg = max((ga_h.float() - gb_h.float()).abs().max().item(), (ga_w.float() - gb_w.float()).abs().max().item())
        assert e < tol and eg < tol, (dtype, e, eg)
        msgs.append(f"{str(dtype)[6:]}: max |Δlogp| {e:.2e}, |Δgrad| {eg:.2e}")
    return "; ".join(msgs)


@check("qdpo+kd / qdpo+sft mix: CUDA == CPU (fp32), chunked KD head == plain KD, gradients too")
def _mix():
    from qdpo_ray.train.losses import (chunked_response_kd_loss, mixed_loss, preference_loss, response_kd_loss,
                                       sft_nll)

    torch.manual_seed(0)
    h, w, t = torch.randn(300, 512) * 0.5, torch.randn(8000, 512) * 0.02, torch.randn(300, 8000)
    pc, pr, rc, rr = (torch.randn(8) * 10 for _ in range(4))
    lens = torch.randint(5, 60, (8,))
    got = {}
    for dev in ("cpu", "cuda"):
        hh, ww = h.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True)
        pref = preference_loss(*(x.to(dev) for x in (pc, pr, rc, rr)), beta=0.1)
        kd = chunked_response_kd_loss(hh, ww, None, t.to(dev), chunk=64)
        plain = response_kd_loss(hh @ ww.t(), t.to(dev))
        loss = mixed_loss(pref, kd=kd, sft=sft_nll(pc.to(dev), lens.to(dev)), kd_weight=0.5, sft_weight=0.2)
        grads = torch.autograd.grad(loss, (hh, ww))
        got[dev] = (loss.item(), kd.item(), plain.item(), [g.cpu() for g in grads])
    e = abs(got["cpu"][0] - got["cuda"][0])
    ek = abs(got["cuda"][1] - got["cuda"][2])
    eg = max((a - b).abs().max().item() for a, b in zip(got["cpu"][3], got["cuda"][3]))
    assert e < 1e-4 and ek < 1e-4 and eg < 1e-4, (e, ek, eg)
    return f"|Δloss| CPU/CUDA {e:.1e}, chunked vs plain KD {ek:.1e}, |Δgrad| CPU/CUDA {eg:.1e}"


@check("fake-quant step vs plain step, one 4096x11008 layer (CUDA)")
def _speed():
    from qdpo_ray.quant.fake_quant import FakeQuantLinear
    from qdpo_ray.quant.rtn import QuantSpec

    torch.manual_seed(0)
    times = {}
    for kind in ("plain", "fake-quant"):
        lin = torch.nn.Linear(4096, 11008, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = FakeQuantLinear.from_linear(lin, QuantSpec(4)) if kind == "fake-quant" else lin
        x = torch.randn(8 * 512, 4096, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            layer(x).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            layer(x).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        times[kind] = (time.perf_counter() - t0) / 20
    return (f"plain {times['plain'] * 1e3:.2f} ms, fake-quant {times['fake-quant'] * 1e3:.2f} ms "
            f"({times['fake-quant'] / times['plain']:.2f}x) per fwd+bwd of 4096 tokens")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'}")
    for name, ok, detail in RESULTS:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    sys.exit(0 if all(ok for _, ok, _ in RESULTS) else 1)
