"""`qdpo-ray plan`: GPUs, memory per GPU, disk and a time range for every stage of a run, from the
model's config alone (the model is built on the meta device: no weights are read or downloaded).

    qdpo-ray plan --config configs/paper_vicuna7b_hh.yaml [--gpu-memory-gib 80] [--strict]

Per stage (what `pipeline.STAGES` runs):

- quantize, flips, evaluate: the driver process on the CPU, fp32 copies of the model in host memory.
- pairs: `pairs.engine.num_actors` vLLM engines per model (fp and π_q); each engine's GPUs hold its weights
  and, within `gpu_memory_utilization`, the KV cache.
- train: Ray Train workers under DeepSpeed ZeRO. Per GPU: π_θ's model states (`train/memory.py`), the
  frozen teacher / reference the objective holds (`train/steps.objective_of`), the activations the
  selective checkpointing keeps per decoder layer (`train/checkpointing.py`), the full-vocabulary logits
  of the token-level objectives, the ZeRO buckets and a fixed runtime overhead.
- serve: the fp and W4 deployments, one vLLM engine per replica.

Every bytes-per-parameter fact comes from `train/memory.py`; the throughput assumptions behind the time
ranges are the constants below and are printed with the table. Memory figures are estimates at the
configured maximum lengths (the largest micro-batch training can build), i.e. upper bounds on typical steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdpo_ray.config import ConfigError, RunConfig
from qdpo_ray.train import memory

GiB = 2**30
REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "configs" / "models"
# Model names whose config.json ships with the project (configs/models/), so that planning needs neither
# the network nor the weights: the paper's model and the embedded default (before its one-time conversion).
SHIPPED_CONFIGS: dict[str, str] = {"lmsys/vicuna-7b-v1.5": "vicuna-7b-v1.5.json",
                                   "smollm2-135m": "smollm2-135m-instruct.json"}

# ---- assumptions (printed with the plan) ---------------------------------------------------------
# Dense bf16 tensor-core peaks (SXM parts); fp32 training runs on TF32 at half of it.
PEAK_TFLOPS = {"H100": 989.0, "A100": 312.0}
MFU = (0.15, 0.40)
# CPU training: sustained fp32 FLOP/s of one Ray Train worker, from a 2-core laptop (the default demo: ~0.1)
# to a large node.
CPU_TRAIN_TFLOPS = (0.05, 0.5)
# Driver-side CPU work (flips, evaluate): fp32 FLOP/s of the driver process.
CPU_DRIVER_TFLOPS = (0.05, 1.0)
# vLLM output tokens/s of one engine at batch 64: GPU figures for a 7B model (docs/cluster.md), scaled
# by 7B / parameters (decoding reads every weight once per step); CPU figures for the 135M default,
# scaled by 135M / parameters.
GPU_ENGINE_TOKENS_S = (1000.0, 3000.0)
GPU_ENGINE_REF_PARAMS = 6.74e9
CPU_ENGINE_TOKENS_S = (40.0, 150.0)
CPU_ENGINE_REF_PARAMS = 1.35e8
# Device memory outside the tensors counted here: CUDA context, NCCL, allocator slack.
GPU_RUNTIME_GIB = 3.0
# vLLM's own activations and CUDA graphs inside gpu_memory_utilization.
VLLM_OVERHEAD_GIB = 2.0
# A CPU worker's resident memory besides the tensors counted here: the imports alone (Python, torch, Ray,
# DeepSpeed, transformers) measure 0.54 GiB of ru_maxrss; a Ray Train worker adds Ray's core worker, gloo
# and DeepSpeed's shared-memory op (docs/benchmarks.md, "Planner").
CPU_PROCESS_BASELINE_GIB = 1.0
# DeepSpeed defaults the worker's config leaves as they are (elements).
ZERO_REDUCE_BUCKET = 5e8
ZERO3_PREFETCH = 5e7


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a model config, with exact parameter counts from its meta-device build."""

    params: int          # unique parameters
    linear: int          # Linear weights and biases (lm_head included unless tied)
    other: int           # everything else: embeddings, norms (a tied lm_head is the embedding)
    quantized: int       # weights of the Linears the quant section quantizes
    quantized_rows: int  # their output channels (scales and zero points per row and group)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linear(self) -> int:
        return (self.linear - (0 if self.tied else self.vocab * self.hidden)) // max(1, self.layers)


def load_model_config(name: str, model_config: str | None = None):
    """The transformers config of `model.name`: --model-config, a local directory, a shipped config
    (`SHIPPED_CONFIGS`), or the hub (its cache first)."""
    from transformers import AutoConfig

    if model_config:
        p = Path(model_config)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise ConfigError(f"--model-config {model_config!r}: no such config.json; pass the model's config.json")
        return _config_from_json(p)
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ConfigError(f"model.name {name!r} is a directory without config.json; pass --model-config")
        return _config_from_json(Path(name) / "config.json")
    if name in SHIPPED_CONFIGS:
        return _config_from_json(MODEL_CONFIGS / SHIPPED_CONFIGS[name])
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name {name!r}: cannot read its config.json ({str(e).splitlines()[0]}); "
                          "pass --model-config PATH (the model's config.json) to plan without the hub") from None


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e}); pass the model's config.json to --model-config") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); pass a model's config.json to --model-config") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{path} has no `model_type`; pass a transformers config.json to --model-config")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path}: {e}; pass a transformers config.json to --model-config") from None


def model_shape(hf_config, targets: list[str] = ("Linear",), ignore: list[str] = ("lm_head",)) -> ModelShape:
    """Build the model on the meta device and count its parameters exactly."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from qdpo_ray.quant.fake_quant import quant_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    text = hf_config.get_text_config()
    tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(hf_config, "tie_word_embeddings", False))
    unique = {id(p): p for p in model.parameters()}
    emb = model.get_input_embeddings().weight
    linear_ids = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    linear_ids.discard(id(emb))  # a tied lm_head is the embedding
    q = [m for _, m in quant_targets(model, list(targets), list(ignore)) if isinstance(m, nn.Linear)]
    q = [m for m in q if m.weight is not emb]
    heads = text.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in unique.values()),
        linear=sum(unique[i].numel() for i in linear_ids),
        other=sum(p.numel() for i, p in unique.items() if i not in linear_ids),
        quantized=sum(m.weight.numel() for m in q), quantized_rows=sum(m.out_features for m in q),
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size, tied=tied,
        max_positions=getattr(text, "max_position_embeddings", 0) or 0)


# ---- memory ------------------------------------------------------------------------------------------

def dtype_bytes(dtype: str) -> int:
    return memory.FP32 if dtype in ("float32", "fp32") else memory.BF16


def layer_activation_bytes_per_token(s: ModelShape, act_bytes: int) -> int:
    """What the selective checkpointing keeps per decoder layer and token: the layer input (fp32 residual
    stream) and the outputs of every matmul and of the attention kernel (q, k, v, attention, o_proj,
    gate, up, down) in the compute dtype; the element-wise work is recomputed in backward."""
    return memory.FP32 * s.hidden + act_bytes * (4 * s.hidden + 2 * s.kv_dim + 2 * s.intermediate)


def train_tokens_per_pair(t, objective) -> dict[str, int]:
    """Tokens through each model per pair at the configured maxima: `policy` (π_θ's forward), `frozen`
    (each frozen model's forward), and whether the layout is the prompt-shared one."""
    P, R = t.max_prompt_len, t.max_response_len
    if objective.reference_logps:  # sequence-level: prompt + chosen + rejected in one row (batch.collate_shared)
        policy = P + 2 * R
        kd = P + R if objective.teacher else 0  # qdpo+kd adds a chosen-only pass for the KD term
        return {"policy": policy + kd, "frozen": kd, "logit_rows": kd}
    n = 2 if objective.rejected else 1  # token-level: collate's [chosen…, rejected…] rows
    return {"policy": n * (P + R), "frozen": n * (P + R), "logit_rows": n * (P + R)}


def full_logit_tensors(objective) -> int:
    """[tokens, vocab] fp32 tensors alive at once in a token-level step: π_θ's logits, their log-softmax
    and its gradient, each frozen model's logits, and with a KD term the teacher's log-softmax and its exp."""
    if objective.reference_logps and not objective.teacher:
        return 0  # the response log-probs are scored in chunks (train/logps.py)
    frozen = int(objective.teacher) + int(objective.reference_model)
    return 3 + frozen + (2 if objective.teacher else 0)


@dataclass
class Part:
    name: str
    gib: float
    note: str = ""


def train_memory(s: ModelShape, cfg: RunConfig) -> tuple[list[Part], list[Part]]:
    """(device parts, host parts) of one training worker, in GiB. On a CPU worker both are host memory."""
    from qdpo_ray.train.losses import CHUNK_BYTES
    from qdpo_ray.train.steps import objective_of

    t = cfg.train
    o = objective_of(t)
    world, prec = t.num_workers, t.precision
    gpu = t.gpus_per_worker > 0
    act = memory.BF16 if prec == "bf16" else memory.FP32
    dev_pp, host_pp = memory.policy_bytes(t.zero_stage, world, t.offload)
    parts = [Part("policy states", s.params * dev_pp / GiB,
                  f"{dev_pp:.2f} B/param: ZeRO-{t.zero_stage} over {world} rank(s){', offload' if t.offload else ''}")]
    host = [Part("host: optimizer offload", s.params * host_pp / GiB)] if host_pp else []
    for role, held in (("teacher", o.teacher), ("reference", o.reference_model)):
        if held:
            b = memory.model_bytes(prec, role, s.linear, s.other, t.zero_stage, world)
            parts.append(Part(role, b / GiB, f"full copy: Linear {memory.bytes_per_param(prec, role)} B, other "
                                             f"{memory.bytes_per_param(prec, role, kind='other')} B/param"))
    tok = train_tokens_per_pair(t, o)
    B = t.per_device_batch_size
    policy_tokens = B * tok["policy"]
    per_layer = layer_activation_bytes_per_token(s, act)
    acts = policy_tokens * per_layer * s.layers
    # recomputing one layer in backward: its full activations (about twice the kept ones) and its ŵ
    working = 2 * policy_tokens * per_layer + s.layer_linear() * (memory.FP32 + act)
    parts.append(Part("activations", (acts + working) / GiB,
                      f"{B} × {tok['policy']} tokens × {s.layers} layers × {per_layer / 1024:.1f} KiB (selective "
                      "checkpointing) + one layer recomputed"))
    n_logits = full_logit_tensors(o)
    logits = B * tok["logit_rows"] * s.vocab * memory.FP32 * n_logits
    logits += CHUNK_BYTES * 2  # the chunked head of the sequence-level log-probs, forward and backward
    parts.append(Part("logits", logits / GiB, f"{n_logits} × [{B} × {tok['logit_rows']}, {s.vocab}] fp32"
                      if n_logits else "chunked (train/logps.py)"))
    bucket = min(ZERO_REDUCE_BUCKET, s.params) * memory.FP32
    if t.zero_stage == 3:  # gathered fp32 layers ahead of and in compute
        bucket += (2 * s.layer_linear() + min(ZERO3_PREFETCH, s.params)) * memory.FP32
    parts.append(Part("ZeRO buckets", bucket / GiB, "reduce bucket" + (" + gathered layers" if t.zero_stage == 3 else "")))
    if gpu:
        parts.append(Part("runtime", GPU_RUNTIME_GIB, "CUDA context, NCCL, allocator"))
        # every worker loads the fp32 model on the CPU before DeepSpeed partitions it
        host.append(Part("host: model load (fp32)", s.params * memory.FP32 / GiB))
        if o.teacher:
            host.append(Part("host: teacher load (fp32)", s.params * memory.FP32 / GiB))
    else:
        parts.append(Part("process baseline", CPU_PROCESS_BASELINE_GIB, "Python, torch, Ray, DeepSpeed"))
    return parts, host


def vllm_weight_bytes(s: ModelShape, quantized: bool, bits: int, group_size: int | None, dtype_b: int) -> float:
    """An engine's weights: the fp model in the engine dtype, or the packed W4/W8 checkpoint (packed
    codes, fp32 scales and packed zero points per row and group, the rest in the engine dtype)."""
    if not quantized:
        return s.params * dtype_b
    groups = 1 if group_size is None else max(1, s.quantized // max(1, s.quantized_rows) // group_size)
    return (s.quantized * bits / 8 + s.quantized_rows * groups * (memory.FP32 + bits / 8)
            + (s.params - s.quantized) * dtype_b)


def kv_bytes_per_token(s: ModelShape, dtype_b: int) -> int:
    return 2 * s.layers * s.kv_dim * dtype_b


def engine_dtype_bytes(engine) -> int:
    if engine.dtype == "float32" or (engine.dtype == "auto" and engine.gpus_per_actor == 0):
        return memory.FP32
    return memory.BF16


@dataclass
class StagePlan:
    stage: str
    where: str
    gpus: int
    nodes: int
    gpu_gib: float | None          # peak per GPU
    host_gib: float                # peak host memory (per node for the engines/workers it holds)
    disk_gib: float
    time_s: tuple[float, float] | None
    parts: list[Part] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fits: bool = True


def engine_plan(s: ModelShape, engine, quantized: bool, bits: int, group_size, gpu_gib: float) -> dict[str, Any]:
    """Weights and KV room of one vLLM engine (per GPU under tensor parallelism)."""
    db = engine_dtype_bytes(engine)
    w = vllm_weight_bytes(s, quantized, bits, group_size, db)
    kvt = kv_bytes_per_token(s, db)
    if engine.gpus_per_actor > 0:
        tp = engine.tensor_parallel_size
        budget = engine.gpu_memory_utilization * gpu_gib * GiB
        kv = budget - w / tp - VLLM_OVERHEAD_GIB * GiB
        seq = kv / max(1, kvt / tp * engine.max_model_len)
        return {"weights_gib": w / tp / GiB, "kv_gib": kv / GiB, "gpu_gib": budget / GiB, "sequences": seq,
                "fits": seq >= 1, "gpus": tp}
    kv = engine.kv_cache_gib * GiB
    return {"weights_gib": w / GiB, "kv_gib": kv / GiB, "gpu_gib": None, "sequences": kv / (kvt * engine.max_model_len),
            "fits": True, "gpus": 0, "host_gib": (w + kv) / GiB + CPU_PROCESS_BASELINE_GIB}


def _count_prompts(p) -> int | None:
    """Prompts of a shipped source (builtin:*, mtbench), else `limit` (None: unknown without reading it)."""
    if p.source.startswith("builtin:") or p.source == "mtbench":
        from qdpo_ray.data import load_prompts

        return len(load_prompts(p))
    return p.limit


def _range(work: float, rate: tuple[float, float]) -> tuple[float, float]:
    return work / rate[1], work / rate[0]


def plan_run(cfg: RunConfig, s: ModelShape, gpu_memory_gib: float = 80.0, gpus_per_node: int = 8) -> list[StagePlan]:
    """Every stage of `cfg`'s pipeline with its GPUs, nodes, memory, disk and time range."""
    from qdpo_ray.train.steps import objective_of

    if gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory-gib {gpu_memory_gib}: must be the GPU's memory in GiB, e.g. 80")
    q, t, pe = cfg.quant, cfg.train, cfg.pairs.engine
    src_b = dtype_bytes(cfg.model.dtype)
    fp32 = s.params * memory.FP32 / GiB
    export_gib = vllm_weight_bytes(s, q.enabled, q.bits, q.group_size, src_b) / GiB
    eval_prompts = _count_prompts(cfg.pipeline.eval_prompts)
    train_prompts = _count_prompts(cfg.pipeline.train_prompts)
    out: list[StagePlan] = []
    driver = lambda tf: _range(tf, tuple(x * 1e12 for x in CPU_DRIVER_TFLOPS))  # noqa: E731

    out.append(StagePlan("quantize", "driver CPU", 0, 0, None, fp32 + export_gib + CPU_PROCESS_BASELINE_GIB,
                         export_gib, None, notes=[f"{q.label} export {export_gib:.2f} GiB"]))

    fl = cfg.flips
    flips_tokens = (eval_prompts or 0) * (cfg.train.max_prompt_len + fl.max_new_tokens)
    out.append(StagePlan("flips", "driver CPU", 0, 0, None, 2 * fp32 + CPU_PROCESS_BASELINE_GIB, 0.0,
                         driver(2 * 2 * s.params * flips_tokens) if eval_prompts else None,
                         notes=[f"{eval_prompts} prompts × {fl.max_new_tokens} tokens, fp + π_q in fp32"]))

    # pairs: num_actors engines per model
    fp_e = engine_plan(s, pe, False, q.bits, q.group_size, gpu_memory_gib)
    w4_e = engine_plan(s, pe, q.enabled, q.bits, q.group_size, gpu_memory_gib)
    n_eng = 2 * pe.num_actors
    gpus = math.ceil(n_eng * fp_e["gpus"] * pe.gpus_per_actor)  # a fractional share packs engines on a GPU
    answer_tokens = (train_prompts or 0) * cfg.pairs.max_new_tokens
    if pe.gpus_per_actor > 0:
        scale = GPU_ENGINE_REF_PARAMS / s.params
        rate = tuple(r * scale * pe.num_actors for r in GPU_ENGINE_TOKENS_S)
    else:
        scale = CPU_ENGINE_REF_PARAMS / s.params
        rate = tuple(r * scale * pe.num_actors for r in CPU_ENGINE_TOKENS_S)
    pairs = StagePlan("pairs", "vLLM engines" if gpus else "vLLM engines, CPU", gpus,
                      math.ceil(gpus / gpus_per_node) if gpus else 0, fp_e["gpu_gib"],
                      (fp_e.get("host_gib", 0) + w4_e.get("host_gib", 0)) * pe.num_actors,
                      # the pairs' token ids as int64 (their text aside)
                      (train_prompts or 0) * (cfg.train.max_prompt_len + 2 * cfg.pairs.max_new_tokens) * 8 / GiB,
                      _range(answer_tokens, rate) if train_prompts else None)
    for label, e in (("fp", fp_e), ("π_q", w4_e)):
        pairs.parts.append(Part(f"{label} weights", e["weights_gib"]))
        pairs.parts.append(Part(f"{label} KV cache", e["kv_gib"],
                                f"room for {e['sequences']:.0f} sequence(s) of max_model_len {pe.max_model_len}"))
        pairs.fits &= e["fits"]
    pairs.notes.append(f"{pe.num_actors} fp + {pe.num_actors} π_q engines; {train_prompts} prompts × "
                       f"{cfg.pairs.max_new_tokens} answer tokens per model")
    if not pairs.fits:
        pairs.notes.append(f"WARNING pairs: an engine's weights leave no KV room for one {pe.max_model_len}-token "
                           f"sequence within gpu_memory_utilization {pe.gpu_memory_utilization} of "
                           f"{gpu_memory_gib:g} GiB; raise pairs.engine.tensor_parallel_size or "
                           "gpu_memory_utilization, or lower max_model_len")
    out.append(pairs)

    # train
    o = objective_of(t)
    dev, host = train_memory(s, cfg)
    world = t.num_workers
    gpu_train = t.gpus_per_worker > 0
    tok = train_tokens_per_pair(t, o)
    n_pairs = train_prompts or 0
    per_step = world * t.per_device_batch_size * t.grad_accum
    steps = (t.max_steps or (n_pairs // per_step) * t.epochs) * t.rounds
    flop = steps * per_step * (6 * s.params * tok["policy"]
                               + 2 * s.params * tok["frozen"] * (int(o.teacher) + int(o.reference_model)))
    if o.reference_logps:  # π_ref's log-probs of every pair, before each round's training
        flop += 2 * s.params * n_pairs * tok["policy"] * t.rounds
    total = sum(p.gib for p in dev)
    ckpt_b = (memory.checkpoint_bytes_per_param(t.zero_stage, t.precision, t.lora.enabled)
              if hasattr(memory, "checkpoint_bytes_per_param") else memory.FP32 + memory.ADAM_MOMENTS)
    ckpt = s.params * ckpt_b / GiB
    train = StagePlan("train", f"{world} Ray Train worker(s)" + ("" if gpu_train else ", CPU"),
                      int(math.ceil(world * t.gpus_per_worker)) if gpu_train else 0,
                      math.ceil(world * t.gpus_per_worker / gpus_per_node) if gpu_train else 0,
                      total if gpu_train else None,
                      sum(p.gib for p in host) * (min(world, gpus_per_node) if gpu_train else 1)
                      + (0 if gpu_train else total * world),
                      ckpt * 2 + s.params * memory.FP32 / GiB + export_gib, None, parts=dev + host)
    if gpu_train:
        lo = flop / (world * t.gpus_per_worker * PEAK_TFLOPS["H100"] * 1e12 * MFU[1])
        hi = flop / (world * t.gpus_per_worker * PEAK_TFLOPS["A100"] * 1e12 * MFU[0])
        if t.precision == "fp32":
            lo, hi = 2 * lo, 2 * hi  # TF32 peak is half the bf16 one
        train.time_s = (lo, hi) if steps else None
    else:
        train.time_s = _range(flop, tuple(world * x * 1e12 for x in CPU_TRAIN_TFLOPS)) if steps else None
    train.notes.append(f"{o.step.__name__.removesuffix('_step')}: {steps} steps × {per_step} pairs × "
                       f"{tok['policy']} tokens; {flop:.2e} FLOP")
    train.notes.append(f"disk: DeepSpeed checkpoint {ckpt:.1f} GiB ({ckpt_b:g} B/param) × 2 kept, final fp32 "
                       f"weights, the W4 export")
    if t.lora.enabled:
        train.notes.append("LoRA: planned as full training (an upper bound)")
    if t.rounds > 1:
        train.notes.append(f"{t.rounds} on-policy rounds: the steps of every round, and each later round "
                           "regenerates π_q's answers (the pairs stage's π_q time again, not included)")
    if gpu_train and total > gpu_memory_gib:
        train.fits = False
        train.notes.append(f"WARNING train: {total:.1f} GiB per GPU exceeds {gpu_memory_gib:g} GiB; use "
                           "train.zero_stage=3, more train.num_workers, train.offload=true, or a smaller "
                           "train.per_device_batch_size / max_response_len")
    out.append(train)

    # evaluate: fp, RTN, the trained model and any extra ones, greedy answers + scoring + perplexity
    n_models = 2 + len([k for k in cfg.evaluate.models if k != "rtn"]) + 1
    ev_tokens = n_models * (eval_prompts or 0) * (cfg.train.max_prompt_len + 2 * cfg.flips.max_new_tokens)
    ev_tokens += n_models * (cfg.evaluate.perplexity_texts or 60) * 512
    out.append(StagePlan("evaluate", "driver CPU", 0, 0, None, 2 * fp32 + CPU_PROCESS_BASELINE_GIB, 0.0,
                         driver(2 * s.params * ev_tokens) if eval_prompts else None,
                         notes=[f"{n_models} models × {eval_prompts} prompts, fp32"]))

    # serve: fp and W4 deployments, one engine per replica
    se = cfg.serve.engine
    sfp = engine_plan(s, se, False, q.bits, q.group_size, gpu_memory_gib)
    sw4 = engine_plan(s, se, q.enabled, q.bits, q.group_size, gpu_memory_gib)
    reps = cfg.serve.fp_replicas.max_replicas + cfg.serve.w4_replicas.max_replicas
    sgpus = math.ceil((cfg.serve.fp_replicas.max_replicas * sfp["gpus"] + cfg.serve.w4_replicas.max_replicas
                       * sw4["gpus"]) * se.gpus_per_actor)
    serve = StagePlan("serve", f"Ray Serve, {reps} engine replica(s)" + ("" if sgpus else ", CPU"), sgpus,
                      math.ceil(sgpus / gpus_per_node) if sgpus else 0, sfp["gpu_gib"],
                      sfp.get("host_gib", 0) + sw4.get("host_gib", 0), 0.0, None)
    for label, e in (("fp", sfp), ("W4", sw4)):
        serve.parts += [Part(f"{label} weights", e["weights_gib"]),
                        Part(f"{label} KV cache", e["kv_gib"], f"room for {e['sequences']:.0f} sequence(s) of max_model_len {se.max_model_len}")]
        serve.fits &= e["fits"]
    if not serve.fits:
        serve.notes.append(f"WARNING serve: the fp engine leaves no KV room for one {se.max_model_len}-token "
                           f"sequence in {gpu_memory_gib:g} GiB; raise serve.engine.tensor_parallel_size")
    out.append(serve)
    return out


# ---- output ------------------------------------------------------------------------------------------

def _dur(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def assumptions_text(cfg: RunConfig) -> list[str]:
    t = cfg.train
    if t.gpus_per_worker > 0:
        tr = (f"train: {MFU[0]:.0%}–{MFU[1]:.0%} MFU, fastest at the H100 peak ({PEAK_TFLOPS['H100']:.0f} TFLOP/s "
              f"bf16), slowest at the A100 peak ({PEAK_TFLOPS['A100']:.0f})" + ("; fp32 on TF32 at half" if t.precision == "fp32" else ""))
    else:
        tr = f"train (CPU): {CPU_TRAIN_TFLOPS[0]}–{CPU_TRAIN_TFLOPS[1]} TFLOP/s fp32 per worker"
    e = cfg.pairs.engine
    gen = (f"pairs: {GPU_ENGINE_TOKENS_S[0]:.0f}–{GPU_ENGINE_TOKENS_S[1]:.0f} output tokens/s per GPU engine for "
           f"a {GPU_ENGINE_REF_PARAMS / 1e9:.2f} B model, ∝ 1/parameters" if e.gpus_per_actor > 0 else
           f"pairs (CPU): {CPU_ENGINE_TOKENS_S[0]:.0f}–{CPU_ENGINE_TOKENS_S[1]:.0f} output tokens/s per engine for a "
           f"{CPU_ENGINE_REF_PARAMS / 1e6:.0f} M model, ∝ 1/parameters")
    return [tr, gen, f"flips, evaluate: driver CPU at {CPU_DRIVER_TFLOPS[0]}–{CPU_DRIVER_TFLOPS[1]} TFLOP/s fp32",
            f"memory at the configured maximum lengths; GPU runtime {GPU_RUNTIME_GIB:g} GiB, vLLM overhead "
            f"{VLLM_OVERHEAD_GIB:g} GiB, CPU process baseline {CPU_PROCESS_BASELINE_GIB:g} GiB"]


def format_plan_table(cfg: RunConfig, s: ModelShape, stages: list[StagePlan], gpu_memory_gib: float) -> str:
    lines = [f"model {cfg.model.name}: {s.params / 1e9:.3f} B parameters ({s.linear / 1e9:.3f} B Linear, "
             f"{s.quantized / 1e9:.3f} B quantized {cfg.quant.label}), {s.layers} layers, hidden {s.hidden}, "
             f"vocab {s.vocab}; GPU {gpu_memory_gib:g} GiB",
             f"{'stage':<9} {'where':<36} {'GPUs':>4} {'nodes':>5} {'GiB/GPU':>8} {'host GiB':>8} {'disk GiB':>8}  time",
             "-" * 102]
    for st in stages:
        gpu = f"{st.gpu_gib:.1f}" if st.gpu_gib is not None else "-"
        tm = f"{_dur(st.time_s[0])} – {_dur(st.time_s[1])}" if st.time_s else "-"
        flag = "" if st.fits else "  ✗ does not fit"
        lines.append(f"{st.stage:<9} {st.where:<36} {st.gpus:>4} {st.nodes:>5} {gpu:>8} {st.host_gib:>8.1f} "
                     f"{st.disk_gib:>8.2f}  {tm}{flag}")
    for st in stages:
        if st.parts or st.notes:
            lines.append(f"\n{st.stage}:")
            lines += [f"  {p.name:<20} {p.gib:8.2f} GiB  {p.note}" for p in st.parts]
            lines += [f"  {n}" for n in st.notes if not n.startswith("WARNING")]
    lines.append("\nassumptions:")
    lines += [f"  {a}" for a in assumptions_text(cfg)]
    warnings = [n for st in stages for n in st.notes if n.startswith("WARNING")]
    if warnings:
        lines.append("")
        lines += warnings
    return "\n".join(lines)


def run_plan(cfg: RunConfig, model_config: str | None = None, gpu_memory_gib: float = 80.0,
             gpus_per_node: int = 8) -> tuple[str, list[StagePlan]]:
    """The plan table of `cfg` and its stages (any with `fits` False warns)."""
    hf = load_model_config(cfg.model.name, model_config)
    s = model_shape(hf, cfg.quant.targets, cfg.quant.ignore)
    stages = plan_run(cfg, s, gpu_memory_gib, gpus_per_node)
    return format_plan_table(cfg, s, stages, gpu_memory_gib), stages
