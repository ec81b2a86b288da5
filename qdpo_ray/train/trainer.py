"""QDPO training, driver side: pairs → reference log-probs → Ray Train workers → reports → W4 export.

    read pairs → truncate → reference log-probs once (π_q, same fake-quant forward; `reference`)
    → TorchTrainer(N workers running `worker.train_loop`, DeepSpeed ZeRO-2/3, STE fake-quant π_θ)
    → metrics.csv, TensorBoard events, training.png (`report`) → packed W{bits} export (`export`)

The Ray Train run is named after a hash of the config *and of the pairs' content*, so a re-run of the
same command resumes its checkpoints while new pairs at the same path start a new run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from qdpo_ray.cluster import ensure_ray
from qdpo_ray.config import ConfigError, RunConfig
from qdpo_ray.train.steps import objective_of

log = logging.getLogger(__name__)


def check(cfg: RunConfig) -> None:
    """Refuse, before anything loads, a run whose result could not be exported as configured."""
    from qdpo_ray.quant.export import require_packable

    if cfg.train.export:
        require_packable(cfg.quant.bits, needs="train.export=true writes",
                         hint="set train.export=false to keep only the training checkpoint, or quant.bits=4 or 8")
    if cfg.train.lora.enabled and cfg.train.zero_stage == 3:
        from importlib.metadata import version

        from qdpo_ray.train.checkpointing import check_frozen_recompute

        check_frozen_recompute(True, 3, version("deepspeed"))
    if cfg.train.checkpoint_dir and not Path(cfg.train.checkpoint_dir).is_absolute():
        raise ConfigError(f"train.checkpoint_dir={cfg.train.checkpoint_dir!r} is read on every training node, "
                          "from the worker's own working directory: give an absolute path (e.g. /mnt/nvme/qdpo) "
                          "or null for the system temp dir")
    if cfg.train.init_from:
        from qdpo_ray.quant.export import check_quantized_dir

        check_quantized_dir(cfg.train.init_from, "train.init_from")
        if cfg.train.lora.enabled:
            raise ConfigError("train.init_from starts full fake-quant training from a quantized checkpoint; LoRA "
                              "trains on an RTN base: set train.lora.enabled=false or drop train.init_from")


def start_weights(path: str, quant=None) -> dict[str, torch.Tensor]:
    """A quantized checkpoint's de-quantized weights with its grid tensors (`fake_quant.checkpoint_grid`);
    with `quant` (the run's QuantConfig) and a `latent.safetensors` beside it (AWQ from `qdpo-ray ptq`), the
    quantized layers' master weights are the latent ones, which round to the same π_q
    (`fake_quant.latent_start`)."""
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import LATENT_FILE, latent_start

    weights = {k: v.detach().clone() for k, v in load_model(path, dtype="float32").state_dict().items()}
    latent_file = Path(path) / LATENT_FILE
    if quant is None or not latent_file.is_file():
        return weights
    from safetensors.torch import load_file

    from qdpo_ray.quant.rtn import QuantSpec

    weights, n = latent_start(weights, load_file(str(latent_file)), QuantSpec.from_config(quant))
    log.info("train.init_from: latent weights of %d quantized layers from %s", n, latent_file)
    return weights


def prepare_pairs(cfg: RunConfig) -> list[dict[str, Any]]:
    from qdpo_ray.generate.pairs import load_pairs
    from qdpo_ray.train.batch import truncate

    rows = load_pairs(cfg.train.pairs)
    rows = [truncate(r, cfg.train.max_prompt_len, cfg.train.max_response_len) for r in rows]
    rows = [r for r in rows if r["chosen_token_ids"] and (r["rejected_token_ids"] or not objective_of(cfg.train).rejected)]
    need = cfg.train.per_device_batch_size * cfg.train.grad_accum * cfg.train.num_workers
    if len(rows) < need:
        raise ConfigError(f"train.pairs={cfg.train.pairs!r} has {len(rows)} usable pairs but one optimizer step "
                          f"needs {need} (per_device_batch_size × grad_accum × num_workers); lower them or "
                          "generate more pairs")
    return rows


def pairs_digest(rows: list[dict[str, Any]]) -> str:
    """What training reads of the pairs: ids and token ids (after truncation)."""
    h = hashlib.sha1()
    for r in sorted(rows, key=lambda r: str(r["id"])):
        h.update(json.dumps([str(r["id"]), list(r["prompt_token_ids"]), list(r["chosen_token_ids"]),
                             list(r["rejected_token_ids"])]).encode())
    return h.hexdigest()


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def reference_key(cfg: RunConfig, digest: str, init_digest: str | None = None) -> str:
    """Everything the reference log-probs depend on: the model (name, revision, dtype), the quantizer,
    the reference's identity (objective), the precision it runs in, the starting weights and the pairs.
    bf16 is named as what it is (autocast over fp32 weights, train/precision.py), so log-probs cached from
    a module cast to bf16 are not reused."""
    precision = cfg.train.precision if cfg.train.precision == "fp32" else f"{cfg.train.precision}-autocast"
    return hashlib.sha1(json.dumps([cfg.model.model_dump(mode="json"), cfg.quant.model_dump(mode="json"),
                                    cfg.train.objective, precision, init_digest, digest],
                                   sort_keys=True).encode()).hexdigest()


# Where and how many checkpoints are kept: no part of the result, so changing them resumes the same run.
CHECKPOINT_STORAGE_FIELDS = ("checkpoint_dir", "keep_checkpoints")


def run_name(cfg: RunConfig, digest: str, init_digest: str | None = None) -> str:
    """The Ray Train run's name, hence its checkpoint folder: a resumed run continues only the same
    configuration on the same pairs from the same starting weights, never a run on other pairs."""
    data = cfg.model_dump(mode="json")
    for k in CHECKPOINT_STORAGE_FIELDS:
        data["train"].pop(k, None)
    return "train-" + _hash([data, digest, init_digest])


def reference_rows(cfg: RunConfig, rows: list[dict[str, Any]], out: Path, pad_id: int = 0,
                   init_weights_ref=None, init_digest: str | None = None) -> list[dict[str, Any]]:
    """Rows with ref log-probs (scored on the cluster by `reference.score_on_ray`), cached in
    out/reference.parquet for the same pairs and reference."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qdpo_ray.io import atomic_path
    from qdpo_ray.train.reference import score_on_ray

    if not objective_of(cfg.train).reference_logps:
        return rows
    key = reference_key(cfg, pairs_digest(rows), init_digest)
    cache = out / "reference.parquet"
    if cache.is_file():
        table = pq.read_table(cache)
        if (table.schema.metadata or {}).get(b"key") == key.encode():
            return table.to_pylist()
    log.info("computing reference log-probs for %d pairs on %d Ray Data actor(s)", len(rows), cfg.train.num_workers)
    rows = score_on_ray(cfg, rows, pad_id, init_weights_ref)
    with atomic_path(cache) as tmp:
        pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata({b"key": key.encode()}), tmp)
    return rows


def run_train(cfg: RunConfig, init_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train, report and export; returns a summary dict (also written to <out>/summary.json).

    `init_weights`: start π_θ (and, for QDPO, the reference) from these master weights instead of the
    fp model — an on-policy round continuing from the previous round's result.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from qdpo_ray.io import atomic_write_json
    from qdpo_ray.models import load_tokenizer
    from qdpo_ray.train.resume_state import drop_resume_state
    from qdpo_ray.train.export import export_trained
    from qdpo_ray.train.report import write_reports

    check(cfg)
    t = cfg.train
    if init_weights is None and t.init_from:
        init_weights = start_weights(t.init_from, cfg.quant)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = prepare_pairs(cfg)
    tok = load_tokenizer(cfg.model)
    ensure_ray(int(t.num_workers * t.cpus_per_worker) + 2)
    init_ref = ray.put(init_weights) if init_weights is not None else None
    init_digest = _weights_digest(init_weights) if init_weights is not None else None
    rows = reference_rows(cfg, rows, out, tok.pad_token_id or 0, init_ref, init_digest)

    resources = {"CPU": t.cpus_per_worker, **t.resources_per_worker}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    cfg_json = cfg.model_dump(mode="json")
    name = run_name(cfg, pairs_digest(rows), init_digest)
    trainer = TorchTrainer(
        _train_loop,
        # the pairs travel through the object store, not a Ray Data split: every (re)started worker
        # derives its own deterministic shard from the same rows (worker.shard_rows)
        train_loop_config={"cfg": cfg_json, "pad_id": tok.pad_token_id or 0, "rows": ray.put(rows),
                           "init_weights": init_ref, "progress_dir": str(out)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(name=name, storage_path=str(out / "ray"),
                                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                                failure_config=FailureConfig(max_failures=t.max_failures)),
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
               "final": history[-1] if history else None, "checkpoint": result.checkpoint.path,
               "run_name": name}
    write_reports(history, out, objective=t.objective,
                  title=f"{t.objective.upper()} ({cfg.quant.label}, {'' if t.objective == 'kd' else f'β={t.beta}, '}lr={t.lr})")
    summary.update(export_trained(cfg, weights, out, tok, init_weights))
    summary["codes_moved"] = codes_moved(cfg, weights, init_weights)
    summary["resume_state_freed_gb"] = round(drop_resume_state(Path(result.checkpoint.path).parent) / 1e9, 2)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _train_loop(config: dict[str, Any]) -> None:
    from qdpo_ray.train.worker import train_loop

    train_loop(config)


def _weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def codes_moved(cfg: RunConfig, weights: dict[str, torch.Tensor],
                init_weights: dict[str, torch.Tensor] | None = None) -> float | None:
    """Fraction of the quantized layers' integer codes that training changed (vs. its starting point)."""
    if not cfg.quant.enabled or cfg.train.lora.enabled:
        return None
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import checkpoint_grid, quant_targets
    from qdpo_ray.quant.rtn import QuantSpec, compute_qparams, quantize

    start = load_model(cfg.model, dtype="float32")
    if init_weights is not None:
        start.load_state_dict(init_weights, strict=False)
    grid = checkpoint_grid(init_weights or {})
    spec = QuantSpec.from_config(cfg.quant)
    moved = total = 0
    for name, module in quant_targets(start, cfg.quant.targets, cfg.quant.ignore):
        w0 = module.weight.detach().float()
        w1 = weights[f"{name}.weight"].float()
        s0, z0 = grid.get(name) or compute_qparams(w0, spec)
        if cfg.quant.freeze_qparams or name in grid:
            s1, z1 = s0, z0
        else:
            s1, z1 = compute_qparams(w1, spec)
        q0, q1 = quantize(w0, s0, z0, spec), quantize(w1, s1, z1, spec)
        moved += int((q0 != q1).sum())
        total += q0.numel()
    return moved / max(1, total)


def _load_policy_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise RuntimeError(f"final checkpoint has no {path.name}; the run did not finish")
    return load_file(str(path))
