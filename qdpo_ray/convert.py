"""`qdpo-ray convert`: a PyTorch-pickle (`*.bin`) checkpoint rewritten as safetensors, once.

Every stage loads safetensors only: unpickling a `.bin` file can run any code it names. Many popular
checkpoints (Vicuna v1.5 among them) ship `pytorch_model*.bin` files only, so this command converts them:

    qdpo-ray convert --model lmsys/vicuna-7b-v1.5 --out models/vicuna-7b-v1.5
    # then model.name: models/vicuna-7b-v1.5

Each shard is read with `torch.load(weights_only=True)`, PyTorch's restricted unpickler that builds
tensors, dicts, lists and numbers and refuses any other global (a custom class, a function call), and
written as one safetensors file of the same name pattern, so the output keeps the source's shard layout
(`pytorch_model-00001-of-00002.bin` → `model-00001-of-00002.safetensors`, the index likewise). One shard is
in memory at a time. Tensors that share storage (tied embeddings) are cloned: safetensors stores no
aliases, and transformers ties them again from the config on load.
"""

from __future__ import annotations

import fnmatch
import json
import pickle
import re
import shutil
from pathlib import Path

from qdpo_ray.config import ConfigError
from qdpo_ray.io import atomic_dir

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
SAFE_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
# What a model directory needs besides its weights; repository code (*.py) is never copied.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "vocab.*", "merges.txt", "spiece.model", "*.tiktoken", "chat_template*",
                "LICENSE*", "README.md")


def pickle_weight_files(path: str | Path) -> list[Path]:
    """The `*.bin` weight files of a local model directory that holds no safetensors file ([] otherwise)."""
    path = Path(path)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return []
    return sorted(path.glob("*.bin"))


def needs_conversion(name: str) -> ConfigError:
    """The error of a model whose weights are pickles only, naming the command that converts it."""
    return ConfigError(
        f"model.name={name!r} has PyTorch pickle weights (*.bin) only, and qdpo-ray loads safetensors "
        "only (unpickling a file can run code). Convert it once: "
        f"`qdpo-ray convert --model {name} --out <dir>`, then set model.name to <dir>"
    )


def safetensors_name(bin_name: str) -> str:
    """`pytorch_model-00001-of-00002.bin` → `model-00001-of-00002.safetensors` (transformers' names)."""
    stem = bin_name[: -len(".bin")] if bin_name.endswith(".bin") else bin_name
    return re.sub(r"^pytorch_model", "model", stem) + ".safetensors"


def load_bin(path: str | Path, name: str = "") -> dict:
    """A `.bin` state dict read with the restricted unpickler: tensors only, or a ConfigError."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"model.name={name or str(path)!r}: {Path(path).name} is not a plain state dict of tensors and "
            "is not unpickled (it names objects that the restricted loader refuses: loading it would run "
            f"their code). Use a checkpoint from a source you trust that ships safetensors. ({e})"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"model.name={name or str(path)!r}: {Path(path).name} holds a "
                          f"{type(state).__name__}, not a state dict")
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ConfigError(f"model.name={name or str(path)!r}: {Path(path).name} holds entries that are not "
                          f"tensors ({', '.join(map(str, odd[:5]))}); it is not a model's state dict")
    return state


def unshare(state: dict) -> dict:
    """The state dict with every tensor contiguous and owning its storage alone (safetensors stores no
    aliases): the second and later users of one storage get a copy."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[key] = t.contiguous()
    return out


def _source_dir(src: str, revision: str | None) -> Path:
    """A local directory as it is; a hub id downloaded (weights, configs, tokenizer; never code)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model.name={src!r} is a file; point --model at the model's directory")
        return path
    if src.startswith((".", "/", "~")):
        raise ConfigError(f"model.name={src!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, revision=revision,
                                      allow_patterns=["*.bin", "*.bin.index.json", *COPIED_FILES]))
    except Exception as e:  # hub errors (offline, gated, unknown id) have many types; the message is theirs
        raise ConfigError(f"model.name={src!r}: could not download it from the hub ({type(e).__name__}: {e})") from None


def _shards(src: Path, name: str) -> list[str]:
    """The `.bin` shard file names, in the index's order when there is one."""
    index = src / BIN_INDEX_NAME
    if index.is_file():
        shards = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise ConfigError(f"model.name={name!r}: {BIN_INDEX_NAME} names shards that are missing: "
                              f"{', '.join(missing)}")
        return shards
    if (src / BIN_NAME).is_file():
        return [BIN_NAME]
    if any(src.glob("*.safetensors")):
        raise ConfigError(f"model.name={name!r} has safetensors weights already: set model.name to it, "
                          "no conversion is needed")
    raise ConfigError(f"model.name={name!r} holds neither {BIN_NAME} nor {BIN_INDEX_NAME}")


def _check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ConfigError(f"out={str(out)!r} is the source model's directory or inside it; choose another --out")
    if out.exists() and any(out.iterdir()) and not (
            (out / "config.json").is_file() and any(out.glob("*.safetensors"))):
        raise ConfigError(f"out={str(out)!r} exists and is not a model directory; converting would replace "
                          "it: choose a new --out")


def convert_to_safetensors(src: str | Path, out: str | Path, revision: str | None = None) -> Path:
    """Rewrite the `.bin` checkpoint `src` (a local directory or a hub id) as a safetensors model
    directory `out` with the same shards, configs and tokenizer files; `out` appears complete or not at all."""
    from safetensors.torch import save_file

    name, out = str(src), Path(out)
    source = _source_dir(name, revision)
    shards = _shards(source, name)
    _check_out(source, out)
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_dir(out) as tmp:
        for shard in shards:
            state = unshare(load_bin(source / shard, name))
            target = safetensors_name(shard)
            save_file(state, str(tmp / target), metadata={"format": "pt"})
            weight_map.update({k: target for k in state})
            total += sum(t.numel() * t.element_size() for t in state.values())
            del state
        if len(shards) > 1:
            (tmp / SAFE_INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        for f in sorted(source.iterdir()):
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in COPIED_FILES):
                shutil.copyfile(f, tmp / f.name)
        (tmp / "SOURCE.md").write_text(
            f"Converted by `qdpo-ray convert` from {name}"
            + (f" (revision {revision})" if revision else "")
            + f": {len(shards)} PyTorch .bin shard(s) read with torch.load(weights_only=True), written as "
            "safetensors with the same layout.\n")
    return out
