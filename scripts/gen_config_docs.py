"""Write docs/configuration.md from the pydantic models (CI checks that the file is current).

    python scripts/gen_config_docs.py          # rewrite
    python scripts/gen_config_docs.py --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from qdpo_ray.config import RunConfig

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _type_name(ann) -> str:
    import typing

    if typing.get_origin(ann) is typing.Literal:
        return " / ".join(repr(a) for a in typing.get_args(ann))
    s = str(ann) if typing.get_args(ann) else getattr(ann, "__name__", str(ann))
    return s.replace("typing.", "").replace("NoneType", "None").replace(" | ", " or ")


def _is_section(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _section(prefix: str, model: type[BaseModel]) -> list[str]:
    lines = ["", f"## `{prefix}` — {model.__name__}", "", (model.__doc__ or "").strip(), "",
             "| field | type | default | meaning |", "|---|---|---|---|"]
    inst, nested = model(), []
    for fname, f in model.model_fields.items():
        if _is_section(f.annotation):
            nested.append((f"{prefix}.{fname}", f.annotation))
            lines.append(f"| `{prefix}.{fname}` | section | see below | {f.description or ''} |")
            continue
        lines.append(f"| `{prefix}.{fname}` | `{_type_name(f.annotation)}` | `{getattr(inst, fname)!r}` | "
                     f"{(f.description or '').replace('|', '/')} |")
    for sub_prefix, sub in nested:
        lines += _section(sub_prefix, sub)
    return lines


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `qdpo_ray/config.py` by `python scripts/gen_config_docs.py`; do not edit by hand.",
        "",
        "A run is one YAML file of sections (see `configs/`); any field can be overridden on the command",
        "line as `--section.key=value` (e.g. `--quant.bits=3 --quant.group_size=64`). Unknown fields and",
        "out-of-range values are rejected with a message naming the field.",
        "",
    ]
    top = [(n, f) for n, f in RunConfig.model_fields.items() if not _is_section(f.annotation)]
    lines += ["## top level", "", "| field | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | `{_type_name(f.annotation)}` | `{f.default!r}` | {f.description or ''} |" for n, f in top]
    for name, field in RunConfig.model_fields.items():
        if _is_section(field.annotation):
            lines += _section(name, field.annotation)
    return "\n".join(lines) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run `python scripts/gen_config_docs.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
