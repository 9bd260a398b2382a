"""Generate docs/CONFIG.md — the configuration reference — from the pydantic models themselves, so the
reference cannot drift from the code. `python scripts/gen_config_docs.py --check` fails if the file is
stale (the test suite runs it)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "CONFIG.md"

# (title, "module:Class", YAML section prefix)
MODELS = [
    (
        "Pack / plan (`navit plan`, `navit pack`, `navit serve`, live `navit train`)",
        "packer.config:PackConfig",
        "",
    ),
    ("Training (`navit train`)", "trainer.config:TrainConfig", ""),
]


def _range(field) -> str:
    bits = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                bits.append(f"{sym} {v}")
    ann = field.annotation
    if typing.get_origin(ann) is list and typing.get_args(ann):  # list of choices: list[Literal[...]]
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) is typing.Literal:
        bits.append(" \\| ".join(f"`{a}`" for a in typing.get_args(ann)))
    return ", ".join(bits)


def _type_name(ann) -> str:
    if typing.get_origin(ann) is typing.Literal:
        return "choice"
    s = getattr(ann, "__name__", None) or str(ann)
    return s.replace("typing.", "").replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((f"{prefix}{name}.", ann))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, tuple):
            default = list(default)
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | `{default}` | {_range(field)} | {desc} |")
    for p, sub in nested:
        doc = ((sub.__doc__ or "").strip().splitlines() or [""])[0]
        rows.append(f"| **{p.rstrip('.')}** | | | | {doc} |")
        rows.extend(_rows(sub, p))
    return rows


def _dataclass_rows(cls) -> list[str]:
    """Rows for a dataclass whose fields are documented by trailing comments (model/ has no pydantic)."""
    import inspect
    import re

    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), flags=re.M))
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "(preset)"
        kind = getattr(f.type, "__name__", f.type)
        doc = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | {kind} | `{default}` | | {doc} |")
    return rows


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models by `scripts/gen_config_docs.py` — do not edit by hand.",
        "Every field can be set in a YAML file (`--config F`) and overridden with `--set dotted.key=value`;",
        "the common ones also have their own flags (`--seq-len`, `--resolution`, ...). An invalid value",
        "is reported as one line naming the field and its allowed range.",
        "",
        "## Precedence",
        "",
        "The same for every command that takes config (`plan`, `pack`, `serve`, `train`, live `train`):",
        "",
        "1. the defaults below;",
        "2. the config file (`--config F`): one command's config at its top level, or a file with",
        "   `pack:` and/or `train:` sections, each command reading its own (live `train` reads both;",
        "   its `pack:` is optional). A file with sections holds nothing else: any other top-level key",
        "   is refused, naming it;",
        "3. `--set KEY=VALUE`, in order (VALUE is YAML: `--set packing.seq_len=512`,",
        "   `--set model.overrides='{depth: 4}'`; a mapping is merged into the section there;",
        "   `--set KEY=null` sets the field back to unset);",
        "4. an explicit flag (`--seq-len 256` beats `--set packing.seq_len=512`). A flag not given never",
        "   overrides anything.",
        "",
        "Refused, one line naming the key and exit code 2: an unknown field or section (`--set nope=1`,",
        "`--set optimm.lr=5`), `--set` without a dotted KEY (`--set =5`), an invalid value (`--set",
        "packing.seq_len=-1`, `--set packing.seq_len=` — every `--set` is validated, none is skipped), a",
        "file that is not UTF-8 text, YAML nested deeper than 32 levels, a `model.overrides` value that",
        "NaViTConfig refuses (wrong type — YAML reads `nan` as a string, write `.nan` — non-finite float,",
        "`dim`/`heads` < 1, `depth` outside [1, 1024]), and settings that would be ignored: packing",
        "settings for `train --data` (fixed when the pack was made: they apply to live `--images` only)",
        "or for `serve` of a pack directory. `model.attention` `flex` or `varlen` is refused for training",
        "on CPU (FlexAttention has no backward pass there, varlen needs CUDA): use `segment` or `auto`.",
        "",
    ]
    for title, target, prefix in MODELS:
        mod, cls = target.split(":")
        try:
            model = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError):
            continue
        out += [f"## {title}", "", "| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        out += _rows(model, prefix)
        out.append("")
    try:
        from model import NaViTConfig

        out += ["## Model (`NaViTConfig`, `model:` section of a train config)", ""]
        out += ["| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        out += _dataclass_rows(NaViTConfig)
        out.append("")
    except ImportError:
        pass
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/CONFIG.md is stale")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/CONFIG.md is stale: run `python scripts/gen_config_docs.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
