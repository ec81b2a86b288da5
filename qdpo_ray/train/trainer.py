"""QDPO training: Ray Train `TorchTrainer` workers running DeepSpeed ZeRO-2/3 on a fake-quant policy.

Driver (`run_train`): read pairs → truncate → reference log-probs once (π_q, same fake-quant forward)
→ TorchTrainer(N workers, pairs as a Ray Data shard per worker) → metrics.csv, TensorBoard events,
training.png → export the trained master weights as a packed W4 checkpoint.

Worker (`train_loop`): fp model → every quantized Linear becomes an STE FakeQuantLinear (so at step 0
π_θ ≡ π_q) → optional LoRA (peft) → deepspeed.initialize → loop over its shard in a seeded order.
Every `checkpoint_every` optimizer steps all ranks write a DeepSpeed checkpoint and report it to Ray
Train; a restarted worker group (FailureConfig) or a re-run of the same command resumes from the latest
one, skipping the batches already done, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qdpo_ray.cluster import ensure_ray
from qdpo_ray.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"]


# --------------------------------------------------------------------------------------------------
# Worker side


def _deepspeed_config(t) -> dict[str, Any]:
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
        "bf16": {"enabled": t.precision == "bf16"},
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


def build_policy(cfg: RunConfig):
    """π_θ: the fp model with STE fake-quant Linears (and LoRA adapters when configured), with the
    response-log-prob forward mode (`logps`) and selective activation checkpointing (`checkpointing`)."""
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import quantize_model_rtn, to_fake_quant
    from qdpo_ray.train.checkpointing import enable_selective_checkpointing
    from qdpo_ray.train.logps import add_response_logps

    model = load_model(cfg.model, dtype="float32")
    if cfg.train.lora.enabled:
        # Paper Table 7: adapters on a frozen *quantized* base, forward Q(W)x + BAx. The base is π_q as
        # plain Linears holding Q(W) (what `evaluate` rebuilds for an adapter): no fp master copy, no
        # per-forward fake-quant, and the export merges BA into Q(W), the weights the adapters were
        # trained against (not into W).
        model = quantize_model_rtn(model, cfg.quant)
    else:
        model = to_fake_quant(model, cfg.quant)
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


def preference_micro_step(model, b: dict[str, torch.Tensor], t) -> tuple[torch.Tensor, list[float]]:
    """Loss and metric values (METRICS order) of one `collate_shared` micro-batch: one forward of the
    prompt + chosen + rejected rows through the response-only LM head (`logps.response_logps`), then
    eq. 5 against the precomputed reference."""
    from qdpo_ray.train.logps import response_logps
    from qdpo_ray.train.losses import preference_loss

    n = b["ref_chosen"].shape[0]
    lp = response_logps(model, b).double()
    pl = preference_loss(lp[:n], lp[n:], b["ref_chosen"], b["ref_rejected"], t.beta, t.loss_type,
                         t.label_smoothing, b["response_len"][:n], b["response_len"][n:])
    lp = lp.detach()
    vals = [pl.loss.item(), pl.chosen_rewards.mean().item(), pl.rejected_rewards.mean().item(),
            (pl.chosen_rewards - pl.rejected_rewards).mean().item(),
            (pl.chosen_rewards > pl.rejected_rewards).double().mean().item(),
            lp[:n].mean().item(), lp[n:].mean().item()]
    return pl.loss, vals


def _peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _batches(rows: list[dict], bs: int, seed: int, epoch: int) -> list[list[dict]]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(rows), generator=g).tolist()
    return [[rows[i] for i in order[j:j + bs]] for j in range(0, len(order) - bs + 1, bs)]


def train_loop(config: dict[str, Any]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from qdpo_ray.train.batch import collate, collate_shared
    from qdpo_ray.train.losses import kd_loss, sequence_logps

    cfg = RunConfig.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))

    rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda r: r["id"])
    per_epoch = len(rows) // t.per_device_batch_size // t.grad_accum
    if per_epoch == 0:
        raise ValueError(f"worker {rank} has {len(rows)} pairs: fewer than per_device_batch_size × grad_accum")
    total = t.max_steps or per_epoch * t.epochs

    model = build_policy(cfg).train()
    teacher = None
    if t.objective == "kd":
        from qdpo_ray.models import load_model

        teacher = load_model(cfg.model, dtype="float32").requires_grad_(False)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, total))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=_deepspeed_config(t), dist_init_required=False)
    device = engine.device
    pad = int(config.get("pad_id", 0))

    step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ds", load_lr_scheduler_states=True)
            state = json.loads((Path(d) / "train_state.json").read_text())
        step, history = state["step"], state["history"]

    micro_per_step = t.grad_accum
    while step < total:
        epoch, in_epoch = divmod(step, per_epoch)
        batches = _batches(rows, t.per_device_batch_size, cfg.seed, epoch)
        micro = batches[in_epoch * micro_per_step:(in_epoch + 1) * micro_per_step]
        t0 = time.time()
        sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
        for mb in micro:
            if t.objective == "kd":
                b = {k: v.to(device) for k, v in collate(mb, pad, rejected=False).items()}
                tokens = float(b["attention_mask"].sum())
                logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                with torch.no_grad():
                    tl = teacher.to(device)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                loss = kd_loss(logits, tl, b["mask"])
                lp = sequence_logps(logits, b["labels"], b["mask"]).detach().double()
                vals = [loss.item(), 0.0, 0.0, 0.0, 0.0, lp.mean().item(), 0.0]
                del logits, tl
            else:
                b = {k: v.to(device) for k, v in collate_shared(mb, pad).items()}
                tokens = float(b["tokens"])
                loss, vals = preference_micro_step(engine, b, t)
            engine.backward(loss.float())
            engine.step()
            del loss, b
            sums += torch.tensor(vals + [tokens], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        toks = sums[-1].item()
        avg = (sums[:-1] / (world * len(micro))).tolist()
        step += 1
        grad_norm = engine.get_global_grad_norm()
        metrics = {k: v for k, v in zip(METRICS, avg)}
        metrics.update({"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "tokens_per_s": toks / max(1e-9, time.time() - t0), "peak_mem_gb": _peak_mem_gb()})
        history.append(metrics)
        last = step == total
        if step % t.checkpoint_every == 0 or last:
            _report_with_checkpoint(engine, cfg, metrics, history, step, rank, final=last)
        else:
            ray.train.report(metrics)


def _full_state_dict(engine, cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """The full (unpartitioned) fp32 master weights on rank 0."""
    if cfg.train.zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # gathers every partition to rank 0
    else:
        sd = engine.module.state_dict()
    if sd is None:
        return None
    # clone: tied weights share storage, which safetensors refuses
    return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in sd.items()}


def _report_with_checkpoint(engine, cfg, metrics, history, step, rank, final: bool) -> None:
    import ray.train
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="ds")  # collective: every rank writes its ZeRO partition
        sd = _full_state_dict(engine, cfg) if final else None
        if rank == 0:
            (Path(d) / "train_state.json").write_text(json.dumps({"step": step, "history": history}))
            if sd is not None:
                save_file(sd, str(Path(d) / "policy.safetensors"))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


# --------------------------------------------------------------------------------------------------
# Driver side


def prepare_pairs(cfg: RunConfig) -> list[dict[str, Any]]:
    from qdpo_ray.generate.pairs import load_pairs
    from qdpo_ray.train.batch import truncate

    rows = load_pairs(cfg.train.pairs)
    rows = [truncate(r, cfg.train.max_prompt_len, cfg.train.max_response_len) for r in rows]
    rows = [r for r in rows if r["chosen_token_ids"] and (cfg.train.objective == "kd" or r["rejected_token_ids"])]
    need = cfg.train.per_device_batch_size * cfg.train.grad_accum * cfg.train.num_workers
    if len(rows) < need:
        raise ConfigError(f"train.pairs={cfg.train.pairs!r} has {len(rows)} usable pairs but one optimizer step "
                          f"needs {need} (per_device_batch_size × grad_accum × num_workers); lower them or "
                          "generate more pairs")
    return rows


def reference_rows(cfg: RunConfig, rows: list[dict[str, Any]], out: Path, pad_id: int = 0) -> list[dict[str, Any]]:
    """Rows with ref log-probs (scored on the cluster by `reference.score_on_ray`), cached in
    out/reference.parquet for the same pairs and reference."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from qdpo_ray.io import atomic_path
    from qdpo_ray.train.reference import score_on_ray

    if cfg.train.objective == "kd":
        return rows
    key = hashlib.sha1(json.dumps([cfg.model.name, cfg.quant.model_dump(mode="json"), cfg.train.objective,
                                   [(r["id"], r["prompt_token_ids"], r["chosen_token_ids"], r["rejected_token_ids"])
                                    for r in rows]]).encode()).hexdigest()
    cache = out / "reference.parquet"
    if cache.is_file():
        table = pq.read_table(cache)
        if (table.schema.metadata or {}).get(b"key") == key.encode():
            return table.to_pylist()
    log.info("computing reference log-probs for %d pairs on %d Ray Data actor(s)", len(rows), cfg.train.num_workers)
    rows = score_on_ray(cfg, rows, pad_id)
    with atomic_path(cache) as tmp:
        pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata({b"key": key.encode()}), tmp)
    return rows


def run_train(cfg: RunConfig) -> dict[str, Any]:
    """Train, report and export; returns a summary dict (also written to <out>/summary.json)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from qdpo_ray.io import atomic_write_json
    from qdpo_ray.models import load_tokenizer
    from qdpo_ray.train.report import write_reports

    t = cfg.train
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = prepare_pairs(cfg)
    tok = load_tokenizer(cfg.model)
    ensure_ray(int(t.num_workers * t.cpus_per_worker) + 2)
    rows = reference_rows(cfg, rows, out, tok.pad_token_id or 0)

    resources = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    cfg_json = cfg.model_dump(mode="json")
    run_name = "train-" + _hash(cfg_json)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg_json, "pad_id": tok.pad_token_id or 0},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(name=run_name, storage_path=str(out / "ray"),
                                checkpoint_config=CheckpointConfig(num_to_keep=2),
                                failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets={"train": ray.data.from_items(rows)},
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "train_state.json").read_text())
        weights = _load_policy_weights(Path(d) / "policy.safetensors")
    history = state["history"]
    summary = {"objective": t.objective, "steps": state["step"], "pairs": len(rows), "wall_s": round(time.time() - t0, 1),
               "final": history[-1] if history else None, "checkpoint": result.checkpoint.path}
    write_reports(history, out, objective=t.objective,
                  title=f"{t.objective.upper()} ({cfg.quant.label}, {'' if t.objective == 'kd' else f'β={t.beta}, '}lr={t.lr})")
    summary.update(_export_and_count(cfg, weights, out, tok))
    atomic_write_json(out / "summary.json", summary)
    return summary


def _hash(obj: Any) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _load_policy_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise RuntimeError(f"final checkpoint has no {path.name}; the run did not finish")
    return load_file(str(path))


def _export_and_count(cfg: RunConfig, weights: dict[str, torch.Tensor], out: Path, tok) -> dict[str, Any]:
    """Load the trained master weights into π_θ, count parameters, export W{bits} (and the LoRA adapter)."""
    from qdpo_ray.models import checkpoint_dtype
    from qdpo_ray.quant.export import PACKABLE_BITS, export_packed

    model = build_policy(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"trained weights do not fit the policy: missing={missing[:5]} unexpected={unexpected[:5]}")
    info = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}
    if cfg.train.lora.enabled:
        adapter = out / "lora-adapter"
        model.save_pretrained(str(adapter))
        info["adapter"] = str(adapter)
        model = model.merge_and_unload()  # Q(W) + BA (build_policy's base is Q(W)), then quantized below
    if cfg.train.export and cfg.quant.bits in PACKABLE_BITS:
        target = out / f"w{cfg.quant.bits}-{cfg.train.objective}{'-lora' if cfg.train.lora.enabled else ''}"
        export_packed(model, tok, cfg.quant, target, storage_dtype=checkpoint_dtype(cfg.model),
                      extra_readme=f"\nTrained with qdpo-ray `{cfg.train.objective}` from `{cfg.model.name}`.\n")
        info["export"] = str(target)
    return info
