"""Listing the inputs of a plan: a directory tree, a manifest file, or a pyarrow.fs URI.

Owns what counts as an input, its stable key and its label. The output is deterministic: inputs
sorted by key (their path relative to the source root, POSIX separators), ``image_id`` = position in
that order. Nothing is opened here beyond directory listings and the manifest itself.

* Directory (local path, ``file://`` or any URI pyarrow.fs understands, e.g. ``s3://bucket/prefix``):
  every file with an accepted extension (any case) is an input; the label is the first-level folder
  name (ImageFolder; classes sorted) or -1 with ``source.labels=none``. Files directly under the root
  are unlabeled (-1). Hidden files/folders and files with other extensions are *skipped* and reported
  (they are not inputs, so not counted in ``images_in``). A sub-folder that cannot be listed
  (permissions, I/O error) is one *rejected* input, key ``its/path/``, reason ``unreadable folder:
  …``: its images are unknown, and a silent skip would lose them. An unlistable root is an error.
* Manifest (``.csv``, ``.jsonl``/``.ndjson``, ``.parquet``) with a ``path`` column and optional
  ``label``: every row is an input. String labels map to sorted class indices; integer labels are kept
  (null → -1). Relative paths resolve against the manifest's folder. A repeated path, an empty path or
  an unaccepted extension makes a rejection (the row keeps its image_id).
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from packer.config import SourceConfig
from packer.errors import NavitError
from packer.localfile import file_kind
from packer.plan import containers, source_parquet, source_wds
from packer.plan.types import Rejection

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
DUPLICATE_REASON = "duplicate path in manifest"
UNREADABLE_FOLDER = "unreadable folder"  # reason prefix of a folder that could not be listed


@dataclass(frozen=True)
class Skipped:
    """A file found in a directory source that is not an input (hidden, other extension, unreadable)."""

    path: str
    reason: str


@dataclass
class Listing:
    """Inputs in image_id order. ``valid[i]`` is False for inputs already rejected (see ``rejected``)."""

    source: str
    paths: list[str]  # path or URI to read, (n,)
    keys: list[str]  # stable key seeding the image's draws, (n,)
    labels: np.ndarray  # int64 (n,), -1 = unlabeled
    classes: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def valid(self) -> np.ndarray:
        ok = np.ones(len(self.paths), dtype=bool)
        ok[[r.image_id for r in self.rejected]] = False
        return ok


def printable(text: str) -> str:
    """``text`` as valid UTF-8, for reports and output files (images.parquet, rejected.jsonl,
    index.json classes). A name that is not valid UTF-8 is listed by Python with surrogate escapes
    (``os.fsdecode(b"bad\\xff.jpg")``); here each such byte is written as the four characters
    ``\\xNN`` (Python's ``backslashreplace``). Valid text is returned unchanged. Keys and paths keep
    the raw name: they open the file and seed its draws."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (only from hand-made text)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _has_ext(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in exts))


def _is_uri(source: str) -> bool:
    return "://" in source


def _split_uri(source: str) -> tuple[object, str, str]:
    """(pyarrow filesystem, path inside it, prefix that turns a path back into a readable location)."""
    import pyarrow.fs as pafs

    from packer.storage import filesystem

    try:
        fs, path = filesystem(source)  # URI options, else the environment's endpoint (packer.storage)
    except (ValueError, OSError) as e:  # pa.ArrowInvalid is a ValueError
        raise NavitError(f"source {source!r}: {str(e).splitlines()[0]}") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return fs, path, ""  # file:// → plain local paths
    return fs, path, source.split("://", 1)[0] + "://"


def list_source(source: str, cfg: SourceConfig | None = None) -> Listing:
    """List the inputs of ``source`` (directory, manifest file, WebDataset tar shards, Parquet image
    files, or URI of any; ``source.format`` picks the layout or 'auto' recognises it)."""
    cfg = cfg or SourceConfig()
    kind = container_kind(source, cfg)
    if kind is not None:
        check_source(source)
        files = (
            containers.pattern_files(source)
            if containers.is_pattern(source)
            else containers.single_file(source)
        )
        return _list_containers(kind, source, files, cfg, [])
    if source.lower().endswith(MANIFEST_SUFFIXES):
        check_source(source)
        return list_manifest(source, cfg)
    if _is_uri(source):
        return _list_uri_dir(source, cfg)
    check_source(source)
    return _list_local_dir(source, cfg)


def container_kind(source: str, cfg: SourceConfig) -> str | None:
    """'wds' / 'parquet' when ``source`` names container files itself (one file or a pattern), else
    None (folders are recognised once listed: :func:`_by_format`)."""
    lower = source.lower().rstrip("/")
    if cfg.format in ("folder", "manifest"):
        return None
    if lower.endswith(".tar") and cfg.format in ("auto", "wds"):
        return "wds"
    if containers.is_pattern(source):
        if cfg.format != "auto":
            return cfg.format
        if lower.endswith(".tar"):
            return "wds"
        if lower.endswith(".parquet"):
            return "parquet"
        raise NavitError(f"source {source}: a pattern must end in .tar or .parquet (or set source.format)")
    if not lower.endswith(".parquet"):
        return None
    if cfg.format == "parquet" or (_exists(source) and source_parquet.has_image_column(source, cfg)):
        return "parquet"
    return None


def _exists(source: str) -> bool:
    return _is_uri(source) or os.path.isfile(source)


def _list_containers(kind: str, source: str, files: list[tuple[str, str]], cfg: SourceConfig, skipped: list):
    if not files:
        raise NavitError(f"source {source}: no .{'tar' if kind == 'wds' else 'parquet'} files found")
    if kind == "wds":
        return source_wds.list_wds(source, files, cfg, skipped)
    return source_parquet.list_parquet(source, files, cfg, skipped)


def _by_format(
    source: str, found: list[tuple[str, str]], cfg: SourceConfig, skipped: list[Skipped], unlisted=()
) -> Listing:
    """A listed folder as what it holds: image files (ImageFolder), or — with source.format 'wds' /
    'parquet', or 'auto' and no image file but .tar / .parquet files — container files."""
    kind = cfg.format if cfg.format in ("wds", "parquet") else None
    if cfg.format == "auto" and not any(_has_ext(rel, cfg.extensions) for rel, _ in found):
        if any(rel.lower().endswith(".tar") for rel, _ in found):
            kind = "wds"
        elif any(rel.lower().endswith(".parquet") for rel, _ in found):
            kind = "parquet"
    if kind is None:
        return _from_files(source, found, cfg, skipped, unlisted)
    suffix = ".tar" if kind == "wds" else ".parquet"
    files = []
    for rel, path in sorted(found):
        if not cfg.follow_hidden and _is_hidden(rel):
            skipped.append(Skipped(path, "hidden file"))
        elif rel.lower().endswith(suffix):
            files.append((rel, path))
        else:
            skipped.append(Skipped(path, f"not a {suffix} file"))
    if unlisted:
        raise NavitError(f"source {source}: cannot list {unlisted[0][0]} ({unlisted[0][2]})")
    return _list_containers(kind, source, files, cfg, skipped)


def check_source(source: str) -> None:
    """A local source must exist and be a folder, a manifest, a .tar / .parquet file or a pattern
    naming existing ones; NavitError (one line) otherwise. Cheap (one stat), so `navit pack` checks
    it before touching --out. URIs are checked when listed."""
    if _is_uri(source):
        return
    if containers.is_pattern(source):
        containers.pattern_files(source)  # every file a brace names must exist; a glob must match
        return
    if not os.path.exists(source):
        raise NavitError(f"source not found: {source}")
    mode = os.stat(source).st_mode
    if source.lower().endswith(MANIFEST_SUFFIXES + (".tar",)):
        if not stat.S_ISREG(mode):  # a FIFO would block the reader
            raise NavitError(f"source {source}: not a regular file: {file_kind(mode)}")
    elif not stat.S_ISDIR(mode):
        raise NavitError(f"source {source}: not a directory or a manifest ({', '.join(MANIFEST_SUFFIXES)})")


# ----------------------------------------------------------------------------------------------------
# Directories
# ----------------------------------------------------------------------------------------------------


def _list_local_dir(source: str, cfg: SourceConfig) -> Listing:
    root = os.path.abspath(source)
    skipped: list[Skipped] = []
    found: list[tuple[str, str]] = []  # (rel key, absolute path)
    unlisted: list[tuple[str, str, str]] = []  # folders that could not be listed: (key, path, reason)

    def onerror(e: OSError) -> None:
        # os.walk could not list a folder: its images are unknown, so it is recorded as a rejected
        # input (key = its relative path + "/"), never dropped silently.
        why = (e.strerror or type(e).__name__).lower()
        path = os.path.abspath(str(e.filename)) if e.filename is not None else root
        if path == root:
            raise NavitError(f"source {source}: cannot list the source folder ({why})")
        rel = os.path.relpath(path, root).replace(os.sep, "/") + "/"
        unlisted.append((rel, path, f"{UNREADABLE_FOLDER}: {why}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        if not cfg.follow_hidden:
            for d in [d for d in dirnames if d.startswith(".")]:
                skipped.append(Skipped(os.path.join(dirpath, d), "hidden folder"))
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            found.append((rel_dir + name, os.path.join(dirpath, name)))
    return _by_format(source, found, cfg, skipped, unlisted)


def _list_uri_dir(source: str, cfg: SourceConfig) -> Listing:
    import pyarrow.fs as pafs

    fs, base, prefix = _split_uri(source)
    try:
        info = fs.get_file_info(base)
    except OSError as e:
        raise NavitError(f"source {source}: {str(e).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise NavitError(f"source not found: {source}")
    if info.type != pafs.FileType.Directory:
        raise NavitError(f"source {source}: not a directory or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:
        raise NavitError(f"source {source}: cannot list ({str(e).splitlines()[0]})") from None
    base_s = base.rstrip("/")
    found = [(i.path[len(base_s) + 1 :], prefix + i.path) for i in infos if i.type == pafs.FileType.File]
    return _by_format(source, found, cfg, [])


def _from_files(
    source: str,
    found: list[tuple[str, str]],
    cfg: SourceConfig,
    skipped: list[Skipped],
    unlisted: Sequence[tuple[str, str, str]] = (),
) -> Listing:
    keep: list[tuple[str, str]] = []
    for rel, path in sorted(found):
        if not cfg.follow_hidden and _is_hidden(rel):
            skipped.append(Skipped(path, "hidden file"))
        elif not _has_ext(rel, cfg.extensions):
            ext = posixpath.splitext(rel)[1] or "(none)"
            skipped.append(Skipped(path, f"not an image extension: {ext}"))
        else:
            keep.append((rel, path))
    # Unlistable folders take their place in key order (a key ending in "/" never equals a file's).
    folder_reason = {rel: reason for rel, _, reason in unlisted}
    keep = sorted(keep + [(rel, path) for rel, path, _ in unlisted])
    classes: list[str] = []
    labels = np.full(len(keep), -1, dtype=np.int64)
    if cfg.labels == "folder":
        folder = [rel.split("/", 1)[0] if "/" in rel else None for rel, _ in keep]
        classes = sorted({f for f in folder if f is not None})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index.get(f, -1) if f else -1 for f in folder], dtype=np.int64)
        classes = [printable(c) for c in classes]  # names only: sorted (and indexed) by the raw name
    skipped.sort(key=lambda s: s.path)
    rejected = [
        Rejection(i, path, folder_reason[rel], int(labels[i]))
        for i, (rel, path) in enumerate(keep)
        if rel in folder_reason
    ]
    return Listing(
        source=source,
        paths=[p for _, p in keep],
        keys=[r for r, _ in keep],
        labels=labels,
        classes=classes,
        rejected=rejected,
        skipped=skipped,
    )


# ----------------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------------


def _read_manifest_table(source: str):  # -> pa.Table
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    if _is_uri(source):
        fs, path, _ = _split_uri(source)
    else:
        import pyarrow.fs as pafs

        fs, path = pafs.LocalFileSystem(), os.path.abspath(source)
    lower = source.lower()
    try:
        if lower.endswith(".parquet"):
            return pq.read_table(path, filesystem=fs)
        with fs.open_input_file(path) as f:
            if lower.endswith(".csv"):
                opts = pcsv.ConvertOptions(column_types={"path": pa.string()})
                return pcsv.read_csv(f, convert_options=opts)
            return pjson.read_json(f)
    except FileNotFoundError:
        raise NavitError(f"source not found: {source}") from None
    except (pa.ArrowInvalid, OSError) as e:
        if "not found" in str(e).lower() or "no such file" in str(e).lower():
            raise NavitError(f"source not found: {source}") from None
        raise NavitError(f"manifest {source}: cannot read ({str(e).splitlines()[0]})") from None


def _manifest_labels(column) -> tuple[np.ndarray, list[str]]:  # column: pa.ChunkedArray | None
    import pyarrow as pa

    if column is None:
        return np.zeros(0, dtype=np.int64), []
    if pa.types.is_integer(column.type) or pa.types.is_null(column.type):
        vals = column.to_pylist()
        return np.array([-1 if v is None else int(v) for v in vals], dtype=np.int64), []
    if pa.types.is_floating(column.type):
        vals = column.to_pylist()
        if any(v is not None and v != int(v) for v in vals):
            raise NavitError("manifest 'label' column: float labels must be whole numbers")
        return np.array([-1 if v is None else int(v) for v in vals], dtype=np.int64), []
    vals = [None if v is None else str(v) for v in column.to_pylist()]
    classes = sorted({v for v in vals if v is not None and v != ""})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(v, -1) if v else -1 for v in vals], dtype=np.int64), classes


def list_manifest(source: str, cfg: SourceConfig | None = None) -> Listing:
    """List a manifest's rows (see the module docstring)."""
    cfg = cfg or SourceConfig()
    table = _read_manifest_table(source)
    if "path" not in table.column_names:
        raise NavitError(f"manifest {source}: no 'path' column (columns: {', '.join(table.column_names)})")
    raw = [None if p is None else str(p) for p in table.column("path").to_pylist()]
    has_label = "label" in table.column_names and cfg.labels != "none"
    labels, classes = _manifest_labels(table.column("label") if has_label else None)
    if not has_label:
        labels = np.full(len(raw), -1, dtype=np.int64)

    # Where relative paths point: the manifest's own folder (as a local path or a URI prefix).
    if _is_uri(source):
        scheme = source.split("://", 1)[0]
        base = source.rsplit("/", 1)[0]
        local = scheme == "file"
        if local:
            base = base[len("file://") :]
    else:
        base, local = os.path.dirname(os.path.abspath(source)), True

    def resolve(p: str) -> str:
        if _is_uri(p):
            return p[len("file://") :] if p.startswith("file://") else p
        if local:
            return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))
        return base + "/" + posixpath.normpath(p)

    rows = []  # (key, row number, readable path, label)
    for i, p in enumerate(raw):
        p = (p or "").strip()
        key = posixpath.normpath(p.replace("\\", "/")) if p else ""
        rows.append((key, i, resolve(p) if p else "", int(labels[i])))
    rows.sort(key=lambda r: (r[0], r[1]))  # stable: duplicates stay in manifest order
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for image_id, (key, _, path, label) in enumerate(rows):
        reason = None
        if not key:
            reason = "empty path in manifest"
        elif path in seen:
            reason = DUPLICATE_REASON
        elif not _has_ext(key, cfg.extensions):
            reason = f"not an image extension: {posixpath.splitext(key)[1] or '(none)'}"
        seen.add(path)
        if reason:
            rejected.append(Rejection(image_id, path or f"<row {rows[image_id][1]}>", reason, label))
    return Listing(
        source=source,
        paths=[r[2] for r in rows],
        keys=[r[0] for r in rows],
        labels=np.array([r[3] for r in rows], dtype=np.int64),
        classes=classes,
        rejected=rejected,
    )
