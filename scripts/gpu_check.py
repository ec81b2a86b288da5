"""Torch-level checks of the GPU path that CI (CPU-only) cannot run. Needs torch with CUDA only:

    python scripts/gpu_check.py            # prints one line per check, exits 1 if any failed
    python scripts/gpu_check.py --cpu      # the checks that also run on CPU, at a small width (CI runs this)

1. the training loop's metric reduction under NCCL (a CPU tensor there fails at step 1);
2. RTN fake-quant on CUDA gives the same integers as on CPU, and the STE passes gradients unchanged;
3. the chunked response-only LM head equals full-logit log-probs on CUDA (fp32 and bf16), and its
   gradients match;
4. the objective mixes (qdpo+kd, qdpo+sft) give the same loss and gradients on CUDA as on CPU;
5. a fake-quant step's speed against a plain Linear step (one layer, 7B-sized), for docs/benchmarks.md;
6. Llama-7B-width decoder layers (random weights, the project's FakeQuantLinear, selective checkpointing,
   the prompt-shared 4D mask, chunked log-probs, the QDPO loss, bf16 autocast over fp32 parameters): the
   SDPA kernel that runs with the 4D mask and its time, time per layer → MFU, peak memory per layer
   extrapolated to 32 layers;
7. step-0 identity in bf16: the policy (fp32 fake-quant, train mode, checkpointed) and the frozen reference
   (bf16 Q(W) Linears) give the same log-probs, so step-0 rewards are 0;
8. the 4-bit RTN codes of fp16 weights against those of their bf16 cast (what a bf16 module cast changes).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHECKS: list[tuple[str, bool, object]] = []  # (name, also runs on CPU, fn(device))


def check(name, cpu: bool = False):
    def wrap(fn):
        CHECKS.append((name, cpu, fn))
        return fn
    return wrap


def run(device: str) -> list[tuple[str, bool, str]]:
    results = []
    for name, cpu, fn in CHECKS:
        if device == "cpu" and not cpu:
            continue
        try:
            results.append((name, True, fn(device) or ""))
        except Exception as e:  # report and go on: one run should show every check
            results.append((name, False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
    return results


@check("nccl: metrics reduce on the worker's device")
def _nccl(device):
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
def _fq(device):
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
def _head(device):
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
def _mix(device):
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
def _speed(device):
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


# --- a Llama decoder at 7B width in plain torch (no transformers on the device) -------------------------

def _shape(device: str) -> dict:
    """Vicuna-7B's layer on CUDA, with a prompt-shared batch of 4 × (256 prompt + 2 × 64 answer tokens);
    a small width on CPU, where only the mechanics are checked."""
    if device == "cuda":
        return dict(hidden=4096, inter=11008, heads=32, vocab=32000, batch=4, prompt=256, answer=64)
    return dict(hidden=256, inter=640, heads=4, vocab=512, batch=2, prompt=24, answer=12)


def _rms(x, w, eps=1e-5):  # LlamaRMSNorm: fp32 statistics, the input dtype out, times an fp32 weight
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, pos, base=10000.0):
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos[:, None, :, None].float() * inv  # [B, 1, L, d/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class _Layer(torch.nn.Module):
    def __init__(self, h, inter, heads, linear):
        super().__init__()
        self.heads = heads
        for n, (i, o) in dict(q=(h, h), k=(h, h), v=(h, h), o=(h, h), gate=(h, inter), up=(h, inter),
                              down=(inter, h)).items():
            setattr(self, n, linear(i, o))
        self.n1, self.n2 = torch.nn.Parameter(torch.ones(h)), torch.nn.Parameter(torch.ones(h))

    def forward(self, x, mask, pos):
        B, L, h = x.shape
        y = _rms(x, self.n1)
        q, k, v = (m(y).view(B, L, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(_rope(q, pos), _rope(k, pos), v, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, h))
        y = _rms(x, self.n2)
        return x + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))


class _Decoder(torch.nn.Module):
    """Embedding → layers → norm → the chunked response-only LM head (`losses.chunked_token_logps`)."""

    def __init__(self, sh, layers, linear):
        super().__init__()
        self.embed = torch.nn.Embedding(sh["vocab"], sh["hidden"])
        self.layers = torch.nn.ModuleList(_Layer(sh["hidden"], sh["inter"], sh["heads"], linear) for _ in range(layers))
        self.norm = torch.nn.Parameter(torch.ones(sh["hidden"]))
        self.head = linear(sh["hidden"], sh["vocab"])

    def forward(self, b, checkpoint: bool):
        from torch.utils.checkpoint import checkpoint as ckpt

        from qdpo_ray.train.checkpointing import selective_checkpoint_context
        from qdpo_ray.train.losses import chunked_token_logps

        x = self.embed(b["input_ids"])
        for layer in self.layers:
            if checkpoint:
                x = ckpt(layer, x, b["attention_mask"], b["position_ids"], use_reentrant=False,
                         context_fn=selective_checkpoint_context)
            else:
                x = layer(x, b["attention_mask"], b["position_ids"])
        h = _rms(x, self.norm).flatten(0, 1)[b["score_index"]]
        head = self.head
        w = head.quantized_weight() if hasattr(head, "quantized_weight") else head.weight
        tok = chunked_token_logps(h, w, None, b["score_labels"])
        n = b["response_len"].shape[0]
        return torch.zeros(n, dtype=torch.float64, device=tok.device).index_add(0, b["score_seq"], tok.double())


def _fake_quant_linear(device):
    from qdpo_ray.quant.fake_quant import FakeQuantLinear
    from qdpo_ray.quant.rtn import QuantSpec

    def make(i, o):
        lin = torch.nn.Linear(i, o, bias=False, device=device)
        torch.nn.init.normal_(lin.weight, std=0.02)
        return FakeQuantLinear.from_linear(lin, QuantSpec(4, group_size=128))
    return make


def _batch(sh, device, seed=0):
    from qdpo_ray.train.batch import collate_shared

    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(3, sh["vocab"], (n,), generator=g).tolist()  # noqa: E731
    rows = [{"prompt_token_ids": r(sh["prompt"]), "chosen_token_ids": r(sh["answer"]),
             "rejected_token_ids": r(sh["answer"])} for _ in range(sh["batch"])]
    return {k: v.to(device) for k, v in collate_shared(rows).items()}


def _qdpo_loss(lp, ref):
    from qdpo_ray.train.losses import preference_loss

    n = lp.shape[0] // 2
    return preference_loss(lp[:n], lp[n:], ref[:n], ref[n:], beta=0.1).loss


def _train_step(model, b, device):
    from qdpo_ray.train.precision import compute_context

    with compute_context("bf16", device):
        lp = model(b, checkpoint=True)
    loss = _qdpo_loss(lp, lp.detach())
    loss.backward()
    return loss


def _layer_flops(sh, tokens, seq):
    """fwd + bwd FLOPs of one decoder layer: 6 × params × tokens for the matmuls, 12 × B × L² × h for QKᵀ and AV."""
    h, i = sh["hidden"], sh["inter"]
    return 6 * (4 * h * h + 3 * h * i) * tokens + 12 * sh["batch"] * seq * seq * h


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


@check("7B-width decoder layers: fake-quant, selective checkpointing, 4D mask, chunked log-probs (bf16)", cpu=True)
def _layers(device):
    torch.manual_seed(0)
    sh = _shape(device)
    b = _batch(sh, device)
    seq, tokens = b["input_ids"].shape[1], b["input_ids"].numel()
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak, secs = {}, {}
    for n in (1, 2):
        model = _Decoder(sh, n, _fake_quant_linear(device)).to(device).train()
        loss = _train_step(model, b, device)  # warm-up
        assert abs(loss.item() - math.log(2)) < 1e-9, loss.item()  # the reference is itself: log 2
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync()
        t0 = time.perf_counter()
        reps = 5 if cuda else 1
        for _ in range(reps):
            _train_step(model, b, device)
        sync()
        secs[n] = (time.perf_counter() - t0) / reps
        if cuda:
            peak[n] = (torch.cuda.max_memory_allocated() - base) / 2**30, base / 2**30
        del model
    # which SDPA kernel the 4D boolean mask gets, and its time
    from torch.profiler import ProfilerActivity, profile

    model = _Decoder(sh, 1, _fake_quant_linear(device)).to(device).train()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        _train_step(model, b, device)
        sync()
    sdpa = {e.key: e for e in prof.key_averages() if "attention" in e.key.lower() and e.key.startswith("aten::_")}
    assert sdpa, "no SDPA kernel in the profile"
    kern = ", ".join(f"{k} {((e.device_time_total if cuda else e.cpu_time_total) / 1e3):.2f} ms"
                     for k, e in sorted(sdpa.items()))
    per_layer = secs[2] - secs[1]
    flops = _layer_flops(sh, tokens, seq)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = f", MFU {flops / per_layer / peak_flops:.1%} of {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops and per_layer > 0 else ""
    mem = ""
    if cuda:
        d = peak[2][0] - peak[1][0]
        mem = (f"; step peak above the resident weights+grads: {peak[1][0]:.2f} GiB (1 layer), {peak[2][0]:.2f} GiB "
               f"(2 layers) → {d:.2f} GiB per layer, {peak[1][0] + 31 * d:.1f} GiB at 32 layers")
    return (f"B={sh['batch']} L={seq} ({tokens} tokens, prompt-shared), {per_layer * 1e3:.1f} ms fwd+bwd per layer "
            f"({flops / 1e12:.2f} TFLOP){mfu}; SDPA: {kern}{mem}")


@check("step-0 identity in bf16: policy (fp32 fake-quant, checkpointed) == reference (bf16 Q(W) Linears)", cpu=True)
def _step0(device):
    import copy

    from qdpo_ray.quant.fake_quant import FakeQuantLinear
    from qdpo_ray.quant.rtn import fake_quantize
    from qdpo_ray.train.precision import compute_context, frozen_for_compute

    torch.manual_seed(0)
    sh = _shape(device)
    policy = _Decoder(sh, 2, _fake_quant_linear(device)).to(device).train()
    reference = copy.deepcopy(policy)
    for name, m in list(reference.named_modules()):
        for child, sub in list(m.named_children()):
            if isinstance(sub, FakeQuantLinear):
                lin = torch.nn.Linear(sub.in_features, sub.out_features, bias=False, device=device)
                lin.weight.data.copy_(fake_quantize(sub.weight.detach().float(), sub.spec))
                setattr(m, child, lin)
    frozen_for_compute(reference, "bf16")
    assert reference.layers[0].q.weight.dtype == torch.bfloat16 and reference.norm.dtype == torch.float32
    b = _batch(sh, device, seed=1)
    with torch.no_grad(), compute_context("bf16", device):
        ref = reference(b, checkpoint=False)
    with compute_context("bf16", device):
        lp = policy(b, checkpoint=True)
    d = (lp.detach() - ref).abs().max().item()
    assert d == 0.0, f"step-0 log-probs differ by {d}"
    loss = _qdpo_loss(lp, ref)
    assert loss.item() == math.log(2), loss.item()
    return f"{lp.numel()} sequence log-probs identical, loss = log 2 exactly"


@check("RTN codes: fp16 weights vs their bf16 cast (4-bit, per channel and g128)", cpu=True)
def _bf16_codes(device):
    from qdpo_ray.quant.rtn import QuantSpec, compute_qparams, quantize

    torch.manual_seed(0)
    shape = (11008, 4096) if device == "cuda" else (640, 256)
    w16 = (torch.randn(*shape, device=device) * 0.02).half()
    out = []
    for spec in (QuantSpec(4), QuantSpec(4, group_size=128)):
        codes = [quantize(w, *compute_qparams(w, spec), spec) for w in (w16.float(), w16.bfloat16().float())]
        out.append(f"{'g128' if spec.group_size else 'per channel'} {(codes[0] != codes[1]).double().mean().item():.2%}")
    return "codes that differ: " + ", ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the checks that also run on CPU, at a small width")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU'}")
    results = run(device)
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return 0 if results and all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
