"""Chat templates: how a conversation becomes the prompt text both models see (`model.chat_template`).

`model.chat_template` is one of
- `auto`: the tokenizer's own template; a tokenizer without one is a ConfigError (Vicuna-7B-v1.5 ships none);
- `none`: plain text, no template (a conversation's turns joined by blank lines);
- a preset of `PRESETS`, written as Jinja from its public specification;
- a Jinja template (text holding `{%` or `{{`), or the path of a `.jinja` file, read once when the config loads.

`resolve_chat_template` turns the value into the Jinja text a tokenizer renders, `install_chat_template` puts it
on a tokenizer: what `models.load_tokenizer` does, so the exports save the same template the stages used.
Torch-free: the config validator imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

AUTO, NONE = "auto", "none"
FIELD = "model.chat_template"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

_ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
              "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
              "{%- endif -%}")

# FastChat's `vicuna_v1.1` conversation (SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>", roles USER and
# ASSISTANT): system + sep, then "ROLE: message" + sep (user) or sep2 (assistant), and "ASSISTANT:" to answer.
# FastChat tokenizes that string with the tokenizer's BOS added; here the template writes it.
VICUNA_V1_1 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    '{%- set system_message = "' + VICUNA_SYSTEM + '" -%}{%- set loop_messages = messages -%}'
    "{%- endif -%}"
    "{{- (bos_token or '') + system_message + ' ' -}}"
    "{%- for message in loop_messages -%}" + _ALTERNATE +
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + message['content'] + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Meta's Llama-2-chat format: every user turn `<s>[INST] … [/INST]`, every answer ` … </s>`, the system message
# inside the first user turn as `<<SYS>>\n…\n<</SYS>>\n\n`; no default system message.
LLAMA_2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}" + _ALTERNATE +
    "{%- if loop.index0 == 0 and system_message is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- (bos_token or '') + '[INST] ' + content | trim + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + content | trim + ' ' + (eos_token or '') -}}{%- endif -%}"
    "{%- endfor -%}"
)

# ChatML: `<|im_start|>role\n…<|im_end|>\n` per message, `<|im_start|>assistant\n` to answer; no default system.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

PRESETS: dict[str, str] = {"vicuna_v1.1": VICUNA_V1_1, "llama-2": LLAMA_2, "chatml": CHATML}

CHOICES = (f"`{AUTO}` (the tokenizer's own), `{NONE}` (plain text), a preset ({', '.join(PRESETS)}), "
           "a Jinja template, or the path of a .jinja file")


def is_jinja(value: str) -> bool:
    return "{%" in value or "{{" in value


def parse_chat_template(value: Any) -> str:
    """A `model.chat_template` value in its stored form: `auto`, `none`, a preset name or Jinja text.

    YAML `true`/`false` (the field's values in earlier versions) are `auto`/`none`; a `.jinja` path becomes the
    file's text. Raises ValueError (the config turns it into a ConfigError naming the field)."""
    if isinstance(value, bool):
        return AUTO if value else NONE
    if not isinstance(value, str):
        raise ValueError(f"must be {CHOICES}")
    if is_jinja(value):
        return value
    name = value.strip()
    if name.lower() in (AUTO, NONE):
        return name.lower()
    if name in PRESETS:
        return name
    path = Path(name).expanduser()
    if name.endswith(".jinja") or path.is_file():
        if not path.is_file():
            raise ValueError(f"no such template file {name!r}; give an existing .jinja file or {CHOICES}")
        text = path.read_text(encoding="utf-8")
        if not is_jinja(text):
            raise ValueError(f"template file {name!r} holds no Jinja ({{% … %}} or {{{{ … }}}})")
        return text
    raise ValueError(f"unknown chat template {name!r}; use {CHOICES}")


def stored_chat_template(value: str) -> str | bool:
    """`value` as configs and keys store it: auto and none as true and false, the field's values in earlier
    versions, so the stage stamps, pair and answer keys of existing runs stay equal."""
    return {AUTO: True, NONE: False}.get(value, value)


def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's own template (the default one where it names several)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    return own or None


def resolve_chat_template(value: str, tokenizer) -> str | None:
    """The Jinja text `value` (a `model.chat_template`) formats prompts with for `tokenizer`; None = plain text."""
    from qdpo_ray.config import ConfigError

    value = parse_chat_template(value)
    if value == NONE:
        return None
    if value == AUTO:
        own = tokenizer_template(tokenizer)
        if own is None:
            name = getattr(tokenizer, "name_or_path", "") or "this model"
            raise ConfigError(
                f"{FIELD}=auto: the tokenizer of {name!r} has no chat template; set {FIELD} to a preset "
                f"({', '.join(PRESETS)}; Vicuna-7B-v1.5 uses vicuna_v1.1), a Jinja template or .jinja file, "
                f"or `{NONE}` for plain-text prompts")
        return own
    return PRESETS.get(value, value)


def install_chat_template(tokenizer, value: str):
    """Put the template `value` resolves to on `tokenizer` (what its save_pretrained then writes) and check that
    it renders a user turn; `auto` and `none` leave the tokenizer's own template as it is. Returns `tokenizer`."""
    from qdpo_ray.config import ConfigError

    template = resolve_chat_template(value, tokenizer)
    value = parse_chat_template(value)
    if template is None or value == AUTO:
        return tokenizer
    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                      tokenize=False)
    except Exception as e:  # jinja2's TemplateSyntaxError / UndefinedError, or the template's raise_exception
        raise ConfigError(f"{FIELD}: the template does not render a user turn ({type(e).__name__}: {e}); "
                          f"fix it or use {CHOICES}") from None
    return tokenizer
