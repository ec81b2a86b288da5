"""Configs: YAML + overrides resolve to typed sections; bad input gives one clear message naming the field."""

import subprocess
import sys

import pytest

from qdpo_ray.cli import resolve
from qdpo_ray.config import ConfigError, RunConfig, apply_overrides, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: some/model\nquant:\n  bits: 4\n")
    cfg = load_config(p, ["--quant.bits=3", "--quant.group_size=64", "--flips.max-new-tokens=12", "out=x"])
    assert cfg.model.name == "some/model"
    assert (cfg.quant.bits, cfg.quant.group_size, cfg.flips.max_new_tokens, cfg.out) == (3, 64, 12, "x")
    assert cfg.quant.label == "W3A16-g64"


def test_shipped_configs_load():
    for name in ("flips", "quantize"):
        assert isinstance(load_config(f"configs/{name}.yaml"), RunConfig)


def test_override_types_follow_yaml():
    d = apply_overrides({}, ["--a.b=3e-6", "--a.c=null", "--a.d=true", "--a.e=text"])
    assert d == {"a": {"b": 3e-6, "c": None, "d": True, "e": "text"}}


@pytest.mark.parametrize("override,expect", [
    ("--quant.bits=9", r"quant\.bits: .*2 to 8, or 16.*got 9"),
    ("--quant.bit=4", r"quant\.bit: unknown field"),
    ("--quant.group_size=1", r"quant\.group_size: .*got 1"),
    ("--model.dtype=float64", r"model\.dtype: .*'float32', 'bfloat16' or 'float16'.*got 'float64'"),
    ("--flips.max_new_tokens=0", r"flips\.max_new_tokens: .*greater than or equal to 1"),
    ("--prompts.limit=abc", r"prompts\.limit: .*valid integer.*got 'abc'"),
    ("quant.bits", r"expected --section\.key=value"),
])
def test_bad_values_name_the_field(override, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(None, [override])


def test_missing_or_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_short_flags_map_to_fields():
    cmd, cfg, _ = resolve(["quantize", "--model", "m", "--bits", "8", "--group-size", "32", "--symmetric",
                           "--out", "o"])
    assert cmd == "quantize"
    assert (cfg.model.name, cfg.quant.bits, cfg.quant.group_size, cfg.quant.symmetric, cfg.out) == \
        ("m", 8, 32, True, "o")


@pytest.mark.parametrize("args,expect", [
    (["quantize", "--bits", "9"], "quant.bits"),
    (["flips", "--prompts", "/no/such/file.jsonl"], "prompts.source='/no/such/file.jsonl': no such file"),
    (["flips", "--prompts", "builtin:eval", "--model", "/no/such/model"], "model.name='/no/such/model'"),
    (["quantize", "--bits", "3", "--model", "x"], "quant.bits=3"),
])
def test_cli_errors_exit_2_without_traceback(args, expect):
    proc = subprocess.run([sys.executable, "-m", "qdpo_ray.cli", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr


def test_configuration_reference_is_current():
    proc = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
