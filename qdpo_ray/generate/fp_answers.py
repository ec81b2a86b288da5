"""The fp model's greedy answers to a prompt set, generated once per machine and kept on disk.

Every `qdpo-ray flips` and `qdpo-ray evaluate` of a model starts from the same thing — the fp model's greedy
answers to the held-out prompts, ~3 minutes of fp32 generation on 2 cores for the 80 built-in ones — and the
pipeline runs both. The answers are a pure function of the weights, the prompts' token ids, the generation
settings and what can change fp32 arithmetic (torch / transformers versions, the CPU's kernel family or the
GPU), so they are kept under `cache_dir()/fp-answers/<key>.json` with all of that in the key. A model that
is not a local directory (a hub id without a pinned revision) is never cached: its weights can change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from qdpo_ray.config import ModelConfig
from qdpo_ray.generate.hf import greedy_generate
from qdpo_ray.io import atomic_write_json

log = logging.getLogger(__name__)


def weights_id(model: ModelConfig, dtype: str) -> str | None:
    """A name for the fp weights as loaded: the local directory's JSON and safetensors files (name, size,
    mtime: weights, config, generation config), or a hub id at a pinned revision; None when neither pins them."""
    from qdpo_ray.models import resolve_model_path

    path = Path(resolve_model_path(model.name))
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in (".json", ".safetensors"))  # weights, eos ids
        stamp = [[f.name, st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
        return json.dumps({"dir": str(path.resolve()), "files": stamp, "dtype": dtype})
    return json.dumps({"hub": model.name, "revision": model.revision, "dtype": dtype}) if model.revision else None


def arithmetic_id(device) -> str:
    """What decides fp32 rounding on `device` besides the weights: library versions and the kernels run."""
    import torch
    import transformers

    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, transformers {transformers.__version__}, {device.type}: {hw}"


def fp_greedy_answers(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                      model_cfg: ModelConfig) -> list[list[int]]:
    """`greedy_generate(model, …)` for `model`, the fp model of `model_cfg` as loaded, from the cache when it
    has them."""
    from qdpo_ray.models import cache_dir

    param = next(model.parameters())
    wid = weights_id(model_cfg, str(param.dtype).removeprefix("torch."))
    if wid is None:
        return greedy_generate(model, tok, prompt_ids, max_new_tokens, batch_size)
    arithmetic = arithmetic_id(param.device)
    key = hashlib.sha256(json.dumps([wid, arithmetic, prompt_ids, max_new_tokens, batch_size]).encode()).hexdigest()[:32]
    path = cache_dir() / "fp-answers" / f"{key}.json"
    if path.is_file():
        log.info("fp answers of %d prompts from %s", len(prompt_ids), path)
        return json.loads(path.read_text())["answers"]
    answers = greedy_generate(model, tok, prompt_ids, max_new_tokens, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"weights": wid, "arithmetic": arithmetic, "answers": answers})
    return answers
