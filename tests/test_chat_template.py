"""model.chat_template: auto / none / presets / Jinja / .jinja files, on the real tokenizer, through formatting,
load_tokenizer, the W4 export and the serve engine arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qdpo_ray.chat_templates import PRESETS, VICUNA_SYSTEM, install_chat_template, resolve_chat_template
from qdpo_ray.config import ConfigError, ModelConfig, QuantConfig, RunConfig, load_config
from qdpo_ray.data import format_prompt

CONVERSATION = ["Hi", "Hello!", "And you?"]  # user, assistant, user (MT-Bench's second turn)
SYSTEM_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]

# Written by hand from each format's public specification, with Llama's BOS/EOS (`<s>`, `</s>`).
EXPECTED = {
    "vicuna_v1.1": (
        "<s>Be brief. USER: What is 2+2? ASSISTANT:",
        f"<s>{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello!</s>USER: And you? ASSISTANT:",
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]",
        "<s>[INST] Hi [/INST] Hello! </s><s>[INST] And you? [/INST]",
    ),
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAnd you?"
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
}


def _messages(turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory, embedded_model_dir):
    """The embedded model's tokenizer saved without its chat template (as Vicuna-7B-v1.5 ships), with its
    config.json: a model directory whose tokenizer has no template."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("bare") / "model"
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    tok.chat_template = None
    tok.save_pretrained(d)
    shutil.copy(f"{embedded_model_dir}/config.json", d / "config.json")
    assert not (d / "chat_template.jinja").exists()
    return str(d)


@pytest.fixture(scope="module")
def bare_tok(bare_dir):
    from qdpo_ray.models import load_tokenizer

    tok = load_tokenizer(bare_dir)  # a bare path: the files as they are
    assert tok.chat_template is None
    return tok


def test_config_values_and_stored_form(tmp_path):
    assert ModelConfig().chat_template == "auto"
    assert ModelConfig(chat_template=True).chat_template == "auto"
    assert ModelConfig(chat_template=False).chat_template == "none"
    assert ModelConfig(chat_template="vicuna_v1.1").chat_template == "vicuna_v1.1"
    # auto/none are stored as true/false: keys and stage stamps written by earlier versions stay equal
    assert ModelConfig().model_dump(mode="json")["chat_template"] is True
    assert ModelConfig(chat_template="none").model_dump(mode="json")["chat_template"] is False
    old = RunConfig().model_dump(mode="json")
    assert RunConfig.model_validate(old).model.chat_template == "auto"
    paper = load_config(Path(__file__).parent.parent / "configs" / "paper_vicuna7b_hh.yaml")
    assert paper.model.chat_template == "vicuna_v1.1"  # Vicuna-7B-v1.5's tokenizer ships no template
    cfg = load_config(None, ["--model.chat_template=llama-2"])
    assert RunConfig.model_validate(cfg.model_dump(mode="json")).model.chat_template == "llama-2"

    with pytest.raises(ConfigError, match=r"model\.chat_template: .*unknown chat template 'vicuna'.*vicuna_v1\.1, "
                                          r"llama-2, chatml"):
        load_config(None, ["--model.chat_template=vicuna"])
    with pytest.raises(ConfigError, match=r"model\.chat_template: .*no such template file"):
        load_config(None, [f"--model.chat_template={tmp_path}/missing.jinja"])
    (tmp_path / "plain.jinja").write_text("no tags here")
    with pytest.raises(ConfigError, match=r"model\.chat_template: .*holds no Jinja"):
        load_config(None, [f"--model.chat_template={tmp_path}/plain.jinja"])


def test_pairs_key_of_the_default_matches_earlier_pairs():
    """A pairs directory generated before the field became a string stored `"chat_template": true`."""
    from qdpo_ray.generate.pairs import generation_key, regeneration_config

    key = generation_key(RunConfig(), "w4")
    assert key["chat_template"] is True
    assert generation_key(load_config(None, ["model.chat_template=vicuna_v1.1"]), "w4")["chat_template"] == "vicuna_v1.1"
    again = regeneration_config(RunConfig(), {**key, "chat_template": "vicuna_v1.1"}, "w4", Path("x"))
    assert again.model.chat_template == "vicuna_v1.1"


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_prompt_strings(bare_tok, name):
    """Each preset renders its format's exact prompt: a system + user turn, and user/assistant/user."""
    render = lambda msgs: bare_tok.apply_chat_template(msgs, chat_template=PRESETS[name], add_generation_prompt=True,
                                                       tokenize=False, bos_token="<s>", eos_token="</s>")
    assert render(SYSTEM_USER) == EXPECTED[name][0]
    assert render(_messages(CONVERSATION)) == EXPECTED[name][1]
    if name != "chatml":  # ChatML enforces no turn order
        with pytest.raises(Exception, match="alternate"):
            render(_messages(["Hi", "Hello!"])[::-1])


def test_auto_without_a_template_is_a_config_error(bare_dir, bare_tok):
    from qdpo_ray.models import load_tokenizer

    msg = r"model\.chat_template=auto: .*has no chat template.*vicuna_v1\.1, llama-2, chatml"
    with pytest.raises(ConfigError, match=msg):
        format_prompt(bare_tok, "Hi", ModelConfig(name=bare_dir))
    with pytest.raises(ConfigError, match=msg):
        load_tokenizer(ModelConfig(name=bare_dir))


def test_presets_format_prompts_of_a_template_less_model(bare_dir, bare_tok):
    bos = bare_tok.bos_token  # the embedded tokenizer's BOS is <|im_start|>
    vicuna = ModelConfig(name=bare_dir, chat_template="vicuna_v1.1")
    ids = format_prompt(bare_tok, "Hi", vicuna)
    assert bare_tok.decode(ids) == f"{bos}{VICUNA_SYSTEM} USER: Hi ASSISTANT:"
    assert ids == bare_tok(f"{bos}{VICUNA_SYSTEM} USER: Hi ASSISTANT:", add_special_tokens=False).input_ids
    # system_prompt replaces the template's default system message; MT-Bench's second turn keeps the history
    sys_cfg = vicuna.model_copy(update={"system_prompt": "Be brief."})
    assert bare_tok.decode(format_prompt(bare_tok, CONVERSATION, sys_cfg)) == \
        f"{bos}Be brief. USER: Hi ASSISTANT: Hello!</s>USER: And you? ASSISTANT:"
    chatml = ModelConfig(name=bare_dir, chat_template="chatml")
    assert bare_tok.decode(format_prompt(bare_tok, "Hi", chatml)) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_none_is_plain_text(bare_tok, embedded_model_dir):
    from qdpo_ray.models import load_tokenizer

    none = ModelConfig(chat_template="none")
    assert format_prompt(bare_tok, "Hi there", none) == bare_tok("Hi there").input_ids
    assert bare_tok.decode(format_prompt(bare_tok, CONVERSATION, none)) == "Hi\n\nHello!\n\nAnd you?"
    own = load_tokenizer(ModelConfig(name=embedded_model_dir, chat_template="none"))
    assert own.chat_template  # `none` leaves the tokenizer's own template (for chat routes) in place
    assert format_prompt(own, "Hi there", none) == own("Hi there").input_ids


def test_inline_jinja_and_jinja_file(tmp_path, bare_dir, bare_tok):
    text = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    (tmp_path / "mine.jinja").write_text(text)
    from_file = ModelConfig(name=bare_dir, chat_template=str(tmp_path / "mine.jinja"))
    assert from_file.chat_template == text  # read once when the config loads: workers need no file
    inline = ModelConfig(name=bare_dir, chat_template=text)
    for cfg in (from_file, inline):
        assert bare_tok.decode(format_prompt(bare_tok, CONVERSATION, cfg)) == \
            "[user] Hi\n[assistant] Hello!\n[user] And you?\n>"
    assert resolve_chat_template(text, bare_tok) == text
    broken = ModelConfig(name=bare_dir, chat_template="{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match=r"model\.chat_template: the template does not render"):
        install_chat_template(bare_tok.__class__.from_pretrained(bare_dir), broken.chat_template)


def test_load_tokenizer_installs_and_the_w4_export_saves_it(tmp_path, bare_dir, tiny_llama):
    from transformers import AutoTokenizer

    from qdpo_ray.models import load_tokenizer
    from qdpo_ray.quant.export import export_packed
    from qdpo_ray.quant.fake_quant import to_fake_quant

    cfg = ModelConfig(name=bare_dir, chat_template="vicuna_v1.1")
    tok = load_tokenizer(cfg)
    assert tok.chat_template == PRESETS["vicuna_v1.1"]
    q = QuantConfig(bits=4)
    out = export_packed(to_fake_quant(tiny_llama, q), tok, q, tmp_path / "w4", storage_dtype=torch.float32)
    assert (out / "chat_template.jinja").read_text() == PRESETS["vicuna_v1.1"]
    # what transformers (and vLLM, which loads the same tokenizer files) reads back from the export
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == PRESETS["vicuna_v1.1"]
    assert format_prompt(reloaded, "Hi", ModelConfig(name=str(out))) == format_prompt(tok, "Hi", cfg)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


def test_serve_passes_the_resolved_template_to_vllm(bare_dir, embedded_model_dir):
    """A template-less fp model's chat routes get the preset through vLLM's frontend argument `chat_template`."""
    from ray.llm._internal.serve.engines.vllm.vllm_models import VLLMEngineConfig

    from qdpo_ray.serve.app import llm_config, served_chat_template

    cfg = load_config(None, [f"model.name={bare_dir}", "model.chat_template=vicuna_v1.1"])
    template = served_chat_template(cfg)
    assert template == PRESETS["vicuna_v1.1"]
    c = llm_config(cfg, "w4", "/some/dir", cfg.serve.w4_replicas, template)
    engine = VLLMEngineConfig.from_llm_config(c)  # how Ray Serve splits engine and frontend (OpenAI) arguments
    assert engine.frontend_kwargs["chat_template"] == PRESETS["vicuna_v1.1"]
    from vllm.renderers.chat_utils import load_chat_template, validate_chat_template

    validate_chat_template(template)  # what vLLM's frontend does with the argument: the text itself, not a path
    assert load_chat_template(template) == PRESETS["vicuna_v1.1"]
    assert "chat_template" not in engine.engine_kwargs
    # auto: each directory's own template (no argument); auto on a template-less model fails before any engine
    assert served_chat_template(load_config(None, [f"model.name={embedded_model_dir}"])) is None
    assert "chat_template" not in llm_config(cfg, "w4", "/some/dir", cfg.serve.w4_replicas).engine_kwargs
    with pytest.raises(ConfigError, match=r"model\.chat_template=auto"):
        served_chat_template(load_config(None, [f"serve.fp_model={bare_dir}"]))
