"""Finding container files (WebDataset ``.tar`` shards, Parquet image files) and shared listing helpers.

A container source is one file, a folder or URI prefix holding them (recursively), or a pattern in its
last path component: braces ``train-{000000..000127}.tar`` / ``{a,b}.tar`` (expanded here, as
WebDataset does; every expanded file must exist) or a glob ``*.tar`` (matched against the folder's
listing). Files come back sorted by their name relative to the source, so the listing is stable.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re

import numpy as np

from packer.errors import NavitError

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` → a00b a01b a02b (zero padding kept); ``{x,y}`` → x y; several braces multiply."""
    m = _RANGE.search(pattern)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise NavitError(f"source {pattern}: empty range {{{m.group(1)}..{m.group(2)}}}")
        width = len(m.group(1))
        out = []
        for i in range(lo, hi + 1):
            out += expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :])
        return out
    m = _LIST.search(pattern)
    if m:
        out = []
        for part in m.group(1).split(","):
            out += expand_braces(pattern[: m.start()] + part + pattern[m.end() :])
        return out
    return [pattern]


def is_pattern(source: str) -> bool:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return bool(_RANGE.search(name) or _LIST.search(name) or any(c in name for c in "*?["))


def _fs(location: str):  # -> (pyarrow filesystem, path inside it)
    from packer.storage import filesystem

    try:
        return filesystem(location)
    except (ValueError, OSError) as e:
        raise NavitError(f"source {location}: {str(e).splitlines()[0]}") from None


def _readable(location: str, path: str) -> str:
    """A path inside a filesystem back to a location navit can open (URI prefix kept)."""
    if "://" in location and not location.startswith("file://"):
        return location.split("://", 1)[0] + "://" + path
    return path


def pattern_files(source: str) -> list[tuple[str, str]]:
    """(name, location) of the files a brace or glob pattern names, sorted by name."""
    import pyarrow.fs as pafs

    parent, _, name = source.rstrip("/").rpartition("/")
    parent = parent or "."
    fs, base = _fs(parent)
    if _RANGE.search(name) or _LIST.search(name):
        names = expand_braces(name)
        infos = fs.get_file_info([posixpath.join(base, n) for n in names])
        missing = [n for n, i in zip(names, infos, strict=True) if i.type != pafs.FileType.File]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise NavitError(f"source {source}: {posixpath.join(parent, missing[0])} not found{more}")
    else:
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
        except (FileNotFoundError, OSError) as e:
            raise NavitError(f"source {source}: cannot list {parent} ({str(e).splitlines()[0]})") from None
        names = [
            i.base_name for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, name)
        ]
        if not names:
            raise NavitError(f"source {source}: no file matches {name!r}")
    return sorted((n, _readable(parent, posixpath.join(base, n))) for n in names)


def single_file(source: str) -> list[tuple[str, str]]:
    path = source if "://" in source else os.path.abspath(source)
    return [(source.rstrip("/").rsplit("/", 1)[-1], path)]


def labels_from_values(values: list[int | str | None], where: str) -> tuple[np.ndarray, list[str]]:
    """Raw labels (int, class name, or None) → int64 labels and the sorted class names (empty for
    integer labels). Names map to their index in sorted order, as ImageFolder folders do; None → -1.
    Integers and names in one source cannot be told apart: NavitError."""
    names = sorted({v for v in values if isinstance(v, str)})
    ints = [v for v in values if isinstance(v, int)]
    if names and ints:
        raise NavitError(f"{where}: labels mix integers and class names (e.g. {ints[0]} and {names[0]!r})")
    index = {c: i for i, c in enumerate(names)}
    out = [-1 if v is None else (index[v] if isinstance(v, str) else int(v)) for v in values]
    return np.asarray(out, dtype=np.int64).reshape(len(values)), names


def container_listing(
    source: str, rows: list[tuple], reasons: list[str], skipped: list, labels_kind: str
):  # -> Listing
    """The Listing of a tar or Parquet source from its sorted sample rows ``(key, …, path, raw label)``
    (path at [3], label at [4]) and each row's rejection reason ("" = accepted)."""
    from packer.plan.sources import Listing
    from packer.plan.types import Rejection

    if labels_kind == "none":
        labels, classes = np.full(len(rows), -1, np.int64), []
    else:
        labels, classes = labels_from_values([r[4] for r in rows], f"source {source}")
    rejected = [Rejection(i, rows[i][3], reasons[i], int(labels[i])) for i in range(len(rows)) if reasons[i]]
    return Listing(
        source=source,
        paths=[r[3] for r in rows],
        keys=[r[0] for r in rows],
        labels=labels,
        classes=classes,
        rejected=rejected,
        skipped=sorted(skipped, key=lambda s: s.path),
    )


def names_containers(source: str) -> bool:
    """Whether ``source`` names tar shards or Parquet files itself (a .tar / .parquet file or a
    pattern): commands that take a pack directory *or* an image source tell them apart with it."""
    lower = source.lower().rstrip("/")
    return is_pattern(source) or lower.endswith((".tar", ".parquet"))
