"""Config files and dotted overrides → a validated pydantic model, every mistake one line.

Shared by the pack config (packer/config.py) and the train config (trainer/config.py): YAML files
(one command's config at the top level, or ``pack:`` / ``train:`` sections), ``--set`` values and
named flags, applied in that order (later wins; docs/CONFIG.md, "Precedence")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from packer.errors import ConfigError


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """First error of a pydantic ValidationError as one line: 'packing.seq_len: must be >= 1 (got 0)'."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")  # a validator's own message already says what is wrong
    ctx = first.get("ctx") or {}
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            msg = f"must be {word} {ctx[bound]}"
    if first.get("type") == "literal_error" and "expected" in ctx:
        msg = f"must be one of {ctx['expected']}"
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    got = first.get("input")
    got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "config")
    return f"{where}: {msg}{got_s}"


# A config is a few levels deep; a value nested deeper is a mistake (or an attack on the parser).
MAX_NESTING = 32
# The sections of a file that configures several commands (configs/train_*.yaml): each command
# reads its own; a file without them is one command's config at its top level.
FILE_SECTIONS = ("pack", "train")


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """How deeply lists/dicts nest in ``value`` (a scalar is 0, ``[1]`` is 1); stops counting past
    ``limit``. Iterative, and each container is visited once (YAML aliases share them)."""
    depth, level, seen = 0, [value], set()
    while depth <= limit:
        containers = [x for x in level if isinstance(x, (dict, list, tuple)) and id(x) not in seen]
        if not containers:
            break
        seen.update(id(x) for x in containers)
        depth += 1
        level = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]
    return depth


def load_yaml_text(text: str, what: str) -> Any:
    """YAML text → Python values with the safe loader (libyaml's when installed: fast, and it stops at
    a nesting depth where the pure-Python parser recurses for seconds); ConfigError naming ``what``."""
    import yaml

    deep = ConfigError(f"{what}: nested too deeply (more than {MAX_NESTING} levels)")
    try:
        value = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (safe)
    except RecursionError:
        raise deep from None
    except yaml.YAMLError as e:
        if "maximum nesting depth" in str(e):
            raise deep from None
        raise ConfigError(f"{what}: not valid YAML ({str(e).splitlines()[0]})") from None
    if nesting_depth(value) > MAX_NESTING:
        raise deep
    return value


def parse_yaml_value(text: str, what: str) -> Any:
    """A YAML value typed by a user (``--set KEY=VALUE``); ConfigError naming ``what`` if malformed."""
    return load_yaml_text(text, what)


def check_dotted_key(key: str, what: str) -> None:
    """A dotted field name: non-empty parts (``packing.seq_len``); ConfigError naming ``what``."""
    if not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(
            f"{what}: expected KEY=VALUE with a dotted field name as KEY, e.g. packing.seq_len=512"
        )


def _set_dotted(tree: dict[str, Any], key: str, value: Any, merge: bool = False) -> None:
    """Set ``tree[a][b]... = value`` for key 'a.b...'; with ``merge`` a dict value is merged into
    the section already there (a spec flag such as --resolution sets some of a section's fields)."""
    check_dotted_key(key, f"override '{key}'")
    node = tree
    *parents, last = key.split(".")
    for p in parents:
        child = node.get(p)
        if child is None:  # absent, or a section left empty in YAML ('packing:')
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
        node = child
    if merge and isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **value}
    else:
        node[last] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a dict; one-line error if missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p}: not a text file (not UTF-8); expected YAML") from None
    data = load_yaml_text(text, f"config file {p}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping")
    return data


def file_section(path: str | Path, section: str, required: bool = True) -> dict[str, Any]:
    """The part of a config file that configures one command: its ``section:`` (``pack`` or
    ``train``) if the file has sections, else its top level. A file with sections holds nothing
    else (a typo'd section would otherwise be ignored); ``required``: a file with sections but not
    this one is an error (else: an empty config)."""
    data = read_yaml(path)
    if not any(k in FILE_SECTIONS for k in data):
        return data
    others = [k for k in data if k not in FILE_SECTIONS]
    if others:
        names = ", ".join(f"{s}:" for s in FILE_SECTIONS)
        raise ConfigError(
            f"config file {path}: unknown top-level key {str(others[0])!r} (a file with sections "
            f"holds only {names})"
        )
    if section not in data and required:
        have = ", ".join(f"{k}:" for k in data)
        raise ConfigError(f"config file {path}: no {section}: section (it has {have})")
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"config file {path}: {section}: must be a mapping of fields")
    return body


def build_config(
    cls: type[BaseModel],
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    section: str | None = None,
    sets: dict[str, Any] | None = None,
) -> Any:
    """Validate ``cls`` from an optional YAML file (its ``section``, see :func:`file_section`), then
    ``sets`` (``--set`` values: every one applies, None included), then ``overrides`` (named flags:
    None = not given, ignored). Later wins. Raises ConfigError with one line."""
    data: dict[str, Any] = {}
    if file is not None:
        data = file_section(file, section) if section is not None else read_yaml(file)
    for key, value in (sets or {}).items():
        _set_dotted(data, key, value, merge=True)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value, merge=True)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
