"""The Ray Train worker: π_θ on DeepSpeed ZeRO-2/3, a deterministic shard of the pairs, checkpoints.

`train_loop` runs on every rank: fp model → every quantized Linear becomes an STE FakeQuantLinear (so
at step 0 π_θ ≡ π_q) → optional LoRA (peft) → deepspeed.initialize → the objective's micro-step
(`steps.OBJECTIVES`) over its shard in a seeded order. Every `checkpoint_every` optimizer steps all ranks
write a DeepSpeed checkpoint and report it to Ray Train.

Resume is exact: rank r of w trains on the pairs `sorted by id [r::w]` (cut to the same count on every
rank), batched in an order seeded by (seed, epoch). A restarted worker group (FailureConfig) or a re-run
of the same command loads the latest checkpoint and recomputes the same shards and batches, so it skips
exactly the batches already done and the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qdpo_ray.config import RunConfig
from qdpo_ray.console import write_progress
from qdpo_ray.train.distributed import reduce_step_metrics
from qdpo_ray.train.precision import compute_context
from qdpo_ray.train.resume_state import DS_TAG
from qdpo_ray.train.steps import METRICS, objective_of


def deepspeed_config(t) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        # fp32 parameters in every precision; bf16 is autocast compute (train/precision.py)
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(t, total_steps: int):
    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        if t.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def build_policy(cfg: RunConfig, init_weights: dict[str, torch.Tensor] | None = None):
    """π_θ: the fp model with STE fake-quant Linears (and LoRA adapters when configured), with the
    response-log-prob forward mode (`logps`) and selective activation checkpointing (`checkpointing`).

    `init_weights` (an earlier round's trained master weights) replace the fp weights before the
    quantization grid is taken, so a frozen grid (`quant.freeze_qparams`) is that of the starting point.
    """
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import checkpoint_grid, freeze_grid, quantize_model_rtn, to_fake_quant
    from qdpo_ray.train.checkpointing import enable_selective_checkpointing
    from qdpo_ray.train.logps import add_response_logps

    # the prompt-shared batches use a 4D boolean mask, which only SDPA reads as "True = attend"
    model = load_model(cfg.model, dtype="float32", attn_implementation="sdpa")
    if init_weights is not None:
        load_weights(model, init_weights)
    if cfg.train.lora.enabled:
        # Paper Table 7: adapters on a frozen *quantized* base, forward Q(W)x + BAx. The base is π_q as
        # plain Linears holding Q(W) (what `evaluate` rebuilds for an adapter): no fp master copy, no
        # per-forward fake-quant, and the export merges BA into Q(W), the weights the adapters were
        # trained against (not into W).
        model = quantize_model_rtn(model, cfg.quant)
    else:
        model = to_fake_quant(model, cfg.quant)
        # a quantized starting checkpoint (train.init_from: AWQ, GPTQ) keeps its own grid, so step 0 is it
        freeze_grid(model, checkpoint_grid(init_weights or {}))
    add_response_logps(model)  # before peft wraps it (peft passes the extra forward arguments through)
    enable_selective_checkpointing(model)  # in train mode only
    if cfg.train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = cfg.train.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=lc.target_modules, bias="none",
                                                 task_type="CAUSAL_LM"))
    model.config.use_cache = False
    return model


def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (tied lm_head may be absent; a quantized checkpoint's grid tensors are
    skipped, `fake_quant.checkpoint_grid` reads them); anything else missing is an error."""
    from qdpo_ray.quant.fake_quant import GRID_SUFFIXES

    weights = {k: v for k, v in weights.items() if not k.endswith(GRID_SUFFIXES)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"trained weights do not fit the policy: missing={missing[:5]} unexpected={unexpected[:5]}")


def make_optimizer(params, t):
    """AdamW (DeepSpeedCPUAdam with offload); the fused single-kernel AdamW where torch has it (CPU and
    CUDA, torch ≥ 2.4), which also skips the foreach path's parameter-sized temporaries."""
    if t.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay)
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


def shard_rows(rows: list[dict], rank: int, world: int) -> list[dict]:
    """Rank `rank`'s pairs: sorted by id, every `world`-th, the same count on every rank (collectives
    need equal step counts). Independent of the order the rows arrive in, so a restart gets the same."""
    ordered = sorted(rows, key=lambda r: str(r["id"]))
    return ordered[rank::world][:len(ordered) // world]


def batches(rows: list[dict], bs: int, seed: int, epoch: int) -> list[list[dict]]:
    """Full micro-batches of one epoch in a (seed, epoch)-seeded order; a partial last batch is dropped."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(rows), generator=g).tolist()
    return [[rows[i] for i in order[j:j + bs]] for j in range(0, len(order) - bs + 1, bs)]


def _peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train_loop(config: dict[str, Any]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import ray
    import ray.train

    cfg = RunConfig.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))

    rows = shard_rows(ray.get(config["rows"]), rank, world)
    per_epoch = len(rows) // t.per_device_batch_size // t.grad_accum
    if per_epoch == 0:
        raise ValueError(f"worker {rank} has {len(rows)} pairs: fewer than per_device_batch_size × grad_accum")
    total = t.max_steps or per_epoch * t.epochs

    init = ray.get(config["init_weights"]) if config.get("init_weights") is not None else None
    model = build_policy(cfg, init).train()
    objective = objective_of(t)
    teacher = reference = None
    if objective.teacher:
        from qdpo_ray.models import load_model
        from qdpo_ray.train.precision import frozen_for_compute

        teacher = frozen_for_compute(load_model(cfg.model, dtype="float32"), t.precision)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, total))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=deepspeed_config(t), dist_init_required=False)
    device = engine.device
    if teacher is not None:
        teacher.to(device)
    if objective.reference_model:
        from qdpo_ray.train.reference import load_reference

        reference = load_reference(cfg, init, device)
    pad = int(config.get("pad_id", 0))

    step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "train_state.json").read_text())
            if state["step"] < total:  # a finished run has dropped its DeepSpeed state (train/resume_state.py)
                engine.load_checkpoint(d, tag=DS_TAG, load_lr_scheduler_states=True)
        step, history = state["step"], state["history"]

    while step < total:
        epoch, in_epoch = divmod(step, per_epoch)
        micro = batches(rows, t.per_device_batch_size, cfg.seed, epoch)[in_epoch * t.grad_accum:(in_epoch + 1) * t.grad_accum]
        t0 = time.time()
        sums = [0.0] * (len(METRICS) + 1)
        for mb in micro:
            with compute_context(t.precision, device):
                loss, vals, tokens = objective.step(engine, mb, t, pad, teacher, reference)
            engine.backward(loss.float())
            engine.step()
            del loss
            sums = [a + b for a, b in zip(sums, vals + [tokens])]
        sums = reduce_step_metrics(sums, device)
        step += 1
        grad_norm = engine.get_global_grad_norm()
        metrics = {k: v / (world * len(micro)) for k, v in zip(METRICS, sums[:-1])}
        metrics.update({"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "tokens_per_s": sums[-1] / max(1e-9, time.time() - t0), "peak_mem_gb": _peak_mem_gb()})
        history.append(metrics)
        if rank == 0 and config.get("progress_dir"):
            write_progress(Path(config["progress_dir"]),
                           f"step {step}/{total}  loss {metrics['loss']:.4f}  margin {metrics['rewards/margins']:+.3f}"
                           f"  {metrics['tokens_per_s']:.0f} tok/s")
        last = step == total
        if step % t.checkpoint_every == 0 or last:
            _report_with_checkpoint(engine, cfg, metrics, history, step, rank, final=last)
        else:
            ray.train.report(metrics)


def _full_state_dict(engine, cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """The full (unpartitioned) parameters on rank 0, in their own dtype: fp32 masters in every precision
    (`train.precision` is a compute dtype, train/precision.py)."""
    if cfg.train.zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # gathers every partition to rank 0
    else:
        sd = engine.module.state_dict()
    if sd is None:
        return None
    # clone: tied weights share storage, which safetensors refuses
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}


def _report_with_checkpoint(engine, cfg, metrics, history, step, rank, final: bool) -> None:
    import ray.train
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    # train.checkpoint_dir: a local disk sized for the checkpoint (~12-16 B per parameter over all ranks,
    # memory.checkpoint_bytes); Ray Train copies the directory to storage_path and it is removed after
    local = cfg.train.checkpoint_dir
    if local:
        Path(local).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local, prefix=f"step{step:07d}-rank{rank}-") as d:
        engine.save_checkpoint(d, tag=DS_TAG)  # collective: every rank writes its ZeRO partition
        sd = _full_state_dict(engine, cfg) if final else None
        if rank == 0:
            (Path(d) / "train_state.json").write_text(json.dumps({"step": step, "history": history}))
            if sd is not None:
                save_file(sd, str(Path(d) / "policy.safetensors"))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
