"""`qdpo-ray convert`: PyTorch .bin checkpoints (single file and sharded, tied embeddings) refused by
`load_model` with the command that fixes it, converted to safetensors exactly, and a pickle that carries
code refused without running it.

The .bin files are written as transformers 4 wrote them (`torch.save` of the state dict; a sharded
checkpoint as `pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json`): transformers 5's
`save_pretrained` writes safetensors only.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from qdpo_ray.cli import main
from qdpo_ray.config import ConfigError
from qdpo_ray.convert import convert_to_safetensors, safetensors_name, unshare
from qdpo_ray.models import load_model, load_tokenizer, resolve_model_path


def tiny_llama(tied: bool, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).float().eval()


def save_bin_checkpoint(model, tok, path: Path, shard_bytes: int | None = None) -> Path:
    """`model` as a transformers-4 style .bin checkpoint (tied tensors keep sharing storage in the pickle)."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tok.save_pretrained(path)
    state = model.state_dict()
    if shard_bytes is None:
        torch.save(state, path / "pytorch_model.bin")
        return path
    shards, size = [{}], 0
    for k, t in state.items():
        if shards[-1] and size + t.numel() * t.element_size() > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += t.numel() * t.element_size()
    names = [f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        torch.save(shard, path / name)
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}))
    return path


@pytest.fixture(scope="module")
def tok(embedded_model_dir):
    return load_tokenizer(embedded_model_dir)


def assert_same_model(model, loaded, tok):
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_single_bin_with_tied_embeddings_is_refused_then_converted_exactly(tmp_path, tok):
    model = tiny_llama(tied=True, vocab=len(tok))
    src = save_bin_checkpoint(model, tok, tmp_path / "bin-model")
    with pytest.raises(ConfigError, match=r"model.name=.*qdpo-ray convert --model .*bin-model --out <dir>"):
        load_model(str(src))
    with pytest.raises(ConfigError, match="qdpo-ray convert"):  # what vLLM engines and Serve resolve too
        resolve_model_path(str(src))

    out = convert_to_safetensors(src, tmp_path / "converted")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith(".bin")]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    loaded = load_model(str(out))
    assert_same_model(model, loaded, tok)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied again
    assert load_tokenizer(str(out))("Paris is").input_ids == tok("Paris is").input_ids


def test_sharded_bin_keeps_its_shard_layout(tmp_path, tok):
    model = tiny_llama(tied=False, vocab=len(tok))
    src = save_bin_checkpoint(model, tok, tmp_path / "sharded", shard_bytes=2_000_000)
    bin_map = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    n = len(set(bin_map.values()))
    assert n >= 3
    with pytest.raises(ConfigError, match="qdpo-ray convert"):
        load_model(str(src))

    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "converted")]) == 0
    out = tmp_path / "converted"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: safetensors_name(v) for k, v in bin_map.items()}
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                                                 for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert_same_model(model, load_model(str(out)), tok)


class RunsCode:
    """A pickle payload that would create a directory when unpickled by the unrestricted loader."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_bin_carrying_code_is_refused_and_not_run(tmp_path, tok):
    model = tiny_llama(tied=False, vocab=len(tok))
    src = save_bin_checkpoint(model, tok, tmp_path / "evil")
    sentinel = tmp_path / "code-ran"
    state = model.state_dict()
    state["payload"] = RunsCode(str(sentinel))
    torch.save(state, src / "pytorch_model.bin")

    with pytest.raises(ConfigError, match="not a plain state dict"):
        convert_to_safetensors(src, tmp_path / "converted")
    assert not sentinel.exists() and not (tmp_path / "converted").exists()
    with pytest.raises(ConfigError, match="qdpo-ray convert"):
        load_model(str(src))
    assert not sentinel.exists()


def test_convert_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path, tok, capsys):
    src = save_bin_checkpoint(tiny_llama(tied=False, vocab=len(tok)), tok, tmp_path / "bin-model")
    run = tmp_path / "runs-default"
    run.mkdir()
    (run / "results.json").write_text("{}")
    assert main(["convert", "--model", str(src), "--out", str(run)]) == 2
    assert "out=" in capsys.readouterr().err and (run / "results.json").read_text() == "{}"
    assert main(["convert", "--model", str(src), "--out", str(src / "inside")]) == 2


def test_unshare_copies_only_the_second_user_of_a_storage():
    w = torch.randn(8, 4)
    fused = torch.randn(6, 4)
    state = unshare({"embed": w, "lm_head": w, "q": fused[:3], "k": fused[3:]})
    assert state["embed"].data_ptr() == w.data_ptr() and state["lm_head"].data_ptr() != w.data_ptr()
    assert torch.equal(state["lm_head"], w)
    assert state["q"].untyped_storage().data_ptr() != state["k"].untyped_storage().data_ptr()
    assert torch.equal(torch.cat([state["q"], state["k"]]), fused)
    assert safetensors_name("pytorch_model.bin") == "model.safetensors"
    assert safetensors_name("pytorch_model-00002-of-00003.bin") == "model-00002-of-00003.safetensors"
