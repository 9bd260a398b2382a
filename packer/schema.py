"""The packed-shard format: the one contract between `navit pack` (writer) and `navit train`,
`navit stats`, `navit inspect` and `navit serve` (readers).

This module owns every name, type and version of that format and imports neither Ray nor torch, so
the trainer can use it on a GPU box without Ray.

Layout of a pack directory ``OUT/``::

    OUT/index.json              format, version, resolved config + seed, shard list, totals (written last)
    OUT/images.parquet          one row per input image per epoch: its place, or its rejection reason
    OUT/rejected.jsonl          one line per rejected input: {"path", "reason", "epoch"}
    OUT/shards/shard-000000.parquet, ...   one row per packed sequence (SHARD columns below)

Shards are numbered continuously across epochs (``--epochs E``): index.json gives each shard's
``epoch``; a trainer reads the shards of epoch 0, then epoch 1, and so on.

One shard row = one packed sequence of ``seq_len`` tokens:

- ``patches``   fixed_size_binary(seq_len·p·p·C): uint8 pixels, token-major; each patch in
  (row, col, channel) order; padding tokens are zero.
- ``segment_ids`` fixed_size_list<int16>[seq_len]: 0 = padding, 1..k = k-th image of the row; images
  are contiguous and in order; padding is at the tail.
- ``pos_h``, ``pos_w`` fixed_size_list<int16>[seq_len]: each token's patch row / column in its image's
  grid (dropped tokens are absent; padding is 0).
- per segment, in order: ``image_ids`` list<int64>, ``labels`` list<int64> (−1 = unlabeled),
  ``grid_h``, ``grid_w`` list<int32> (the planned patch grid), ``tokens_full`` list<int32> (tokens
  before dropping; kept tokens = the segment's length).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from packer.errors import DataError

FORMAT_NAME = "navit-packed"
FORMAT_VERSION = 1
CHANNELS = 3
INDEX_FILE = "index.json"
IMAGES_FILE = "images.parquet"
REJECTED_FILE = "rejected.jsonl"
SHARDS_DIR = "shards"
# Rows per Parquet row group: the unit a reader memory-maps and decodes at once.
ROW_GROUP_ROWS = 16
# Default shard size when shard_rows is not given.
TARGET_SHARD_BYTES = 128 * 1024 * 1024

# Columns that are metadata only (stats and inspect read these without touching pixel bytes).
META_COLUMNS = ("segment_ids", "pos_h", "pos_w", "image_ids", "labels", "grid_h", "grid_w", "tokens_full")
SEGMENT_COLUMNS = ("image_ids", "labels", "grid_h", "grid_w", "tokens_full")


def shard_file_name(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:06d}.parquet"


def token_bytes(patch_size: int, channels: int = CHANNELS) -> int:
    return patch_size * patch_size * channels


def default_shard_rows(seq_len: int, patch_size: int) -> int:
    """Sequences per shard so that a shard's patches are about TARGET_SHARD_BYTES."""
    row_bytes = seq_len * token_bytes(patch_size)
    return max(1, TARGET_SHARD_BYTES // row_bytes)


def shard_schema(seq_len: int, patch_size: int, channels: int = CHANNELS) -> pa.Schema:
    """Arrow schema of one shard; the metadata records format, version and geometry."""
    i16 = pa.list_(pa.int16(), seq_len)
    return pa.schema(
        [
            pa.field("patches", pa.binary(seq_len * patch_size * patch_size * channels), nullable=False),
            pa.field("segment_ids", i16, nullable=False),
            pa.field("pos_h", i16, nullable=False),
            pa.field("pos_w", i16, nullable=False),
            pa.field("image_ids", pa.list_(pa.int64()), nullable=False),
            pa.field("labels", pa.list_(pa.int64()), nullable=False),
            pa.field("grid_h", pa.list_(pa.int32()), nullable=False),
            pa.field("grid_w", pa.list_(pa.int32()), nullable=False),
            pa.field("tokens_full", pa.list_(pa.int32()), nullable=False),
        ],
        metadata={
            b"format": FORMAT_NAME.encode(),
            b"version": str(FORMAT_VERSION).encode(),
            b"seq_len": str(seq_len).encode(),
            b"patch_size": str(patch_size).encode(),
            b"channels": str(channels).encode(),
        },
    )


IMAGES_SCHEMA = pa.schema(
    [
        pa.field("epoch", pa.int32()),
        pa.field("image_id", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("orig_h", pa.int32()),  # after EXIF orientation; -1 if the header was unreadable
        pa.field("orig_w", pa.int32()),
        pa.field("grid_h", pa.int32()),  # planned patch grid; -1 if rejected before planning
        pa.field("grid_w", pa.int32()),
        pa.field("n_tokens_full", pa.int32()),
        pa.field("n_tokens", pa.int32()),  # kept tokens
        pa.field("shard", pa.int32()),  # -1 if rejected
        pa.field("row", pa.int32()),
        pa.field("segment", pa.int32()),  # 1-based, as in segment_ids
        pa.field("rejected_reason", pa.string()),  # null if packed
        # Pack-time augmentation (packer.plan.augment): the crop box in upright (EXIF-oriented) source
        # pixels, columns crop_x0 <= x < crop_x1, rows crop_y0 <= y < crop_y1 (the whole image when
        # not augmenting; -1 if rejected before planning), and whether the resized crop was mirrored
        # left-right. Packs written before these columns existed lack them: see read_images.
        pa.field("crop_x0", pa.int32()),
        pa.field("crop_y0", pa.int32()),
        pa.field("crop_x1", pa.int32()),
        pa.field("crop_y1", pa.int32()),
        pa.field("hflip", pa.bool_()),
    ]
)
AUGMENT_COLUMNS = ("crop_x0", "crop_y0", "crop_x1", "crop_y1", "hflip")


def read_images(data_dir: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """Read ``images.parquet`` (optionally some columns / a pyarrow ``filters`` expression), with the
    augmentation columns filled in for packs written before they existed: those packs never
    augmented, so every planned image's crop is the whole image (0, 0, orig_w, orig_h), unflipped.
    DataError (one line) if the file is missing or unreadable."""
    fs, base = resolve_fs(data_dir)
    path = join(base, IMAGES_FILE)
    try:
        with fs.open_input_file(path) as f:
            present = set(pq.read_schema(f).names)
            wanted = list(columns) if columns is not None else [fld.name for fld in IMAGES_SCHEMA]
            missing = [c for c in wanted if c in AUGMENT_COLUMNS and c not in present]
            read = [c for c in wanted if c in present]
            if missing:
                read += [c for c in ("orig_h", "orig_w", "grid_h") if c not in read]
            table = pq.read_table(f, columns=read, filters=filters)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{data_dir}/{IMAGES_FILE}: cannot be read ({str(e).splitlines()[0]})") from None
    if missing:
        planned = pc.greater_equal(table.column("grid_h"), 0)
        fill = {
            "crop_x0": pc.if_else(planned, 0, -1),
            "crop_y0": pc.if_else(planned, 0, -1),
            "crop_x1": pc.if_else(planned, table.column("orig_w"), -1),
            "crop_y1": pc.if_else(planned, table.column("orig_h"), -1),
            "hflip": pa.array(np.zeros(table.num_rows, bool)),
        }
        for c in missing:
            field = IMAGES_SCHEMA.field(c)
            table = table.append_column(field, fill[c].cast(field.type))
    return table.select(wanted)


# ----------------------------------------------------------------------------------------------------
# Building one shard table from numpy arrays
# ----------------------------------------------------------------------------------------------------


@dataclass
class PackedRows:
    """A group of packed sequences in numpy form, ready to become a shard table.

    patches: (R, L, p*p*C) uint8; segment_ids / pos_h / pos_w: (R, L) int16;
    the per-segment lists hold one numpy array per row.
    """

    patches: np.ndarray
    segment_ids: np.ndarray
    pos_h: np.ndarray
    pos_w: np.ndarray
    image_ids: list[np.ndarray]
    labels: list[np.ndarray]
    grid_h: list[np.ndarray]
    grid_w: list[np.ndarray]
    tokens_full: list[np.ndarray]


def _fixed_i16(values: np.ndarray, seq_len: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.int16).reshape(-1), type=pa.int16())
    return pa.FixedSizeListArray.from_arrays(flat, seq_len)


def _ragged(arrays: list[np.ndarray], dtype: Any, pa_type: pa.DataType) -> pa.ListArray:
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa_type))


def rows_to_table(rows: PackedRows, seq_len: int, patch_size: int) -> pa.Table:
    """numpy rows → an Arrow table with exactly :func:`shard_schema`."""
    schema = shard_schema(seq_len, patch_size)
    n = rows.patches.shape[0]
    width = seq_len * token_bytes(patch_size)
    buf = np.ascontiguousarray(rows.patches, dtype=np.uint8).reshape(n, width)
    patches = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(buf.reshape(-1))])
    cols = [
        patches,
        _fixed_i16(rows.segment_ids, seq_len),
        _fixed_i16(rows.pos_h, seq_len),
        _fixed_i16(rows.pos_w, seq_len),
        _ragged(rows.image_ids, np.int64, pa.int64()),
        _ragged(rows.labels, np.int64, pa.int64()),
        _ragged(rows.grid_h, np.int32, pa.int32()),
        _ragged(rows.grid_w, np.int32, pa.int32()),
        _ragged(rows.tokens_full, np.int32, pa.int32()),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def table_to_arrays(table: pa.Table | pa.RecordBatch) -> dict[str, Any]:
    """A shard table (or record batch) → numpy arrays: patches (R, L, p*p*C) uint8, segment_ids /
    pos_h / pos_w (R, L) int16, and per-segment lists of arrays. Zero-copy where Arrow allows."""
    seq_len = int(table.schema.metadata[b"seq_len"])
    n = table.num_rows
    col = table.column("patches")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    width = col.type.byte_width
    data = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=(col.offset + n) * width)
    patches = data[col.offset * width :].reshape(n, seq_len, width // seq_len)
    out: dict[str, Any] = {"patches": patches}
    for name in ("segment_ids", "pos_h", "pos_w"):
        c = table.column(name)
        if isinstance(c, pa.ChunkedArray):
            c = c.combine_chunks()
        out[name] = c.flatten().to_numpy(zero_copy_only=False).reshape(n, seq_len)
    for name in SEGMENT_COLUMNS:
        c = table.column(name)
        out[name] = [np.asarray(v, dtype=np.int64) for v in c.to_pylist()]
    return out


# ----------------------------------------------------------------------------------------------------
# Files: atomic, deterministic writes; checksums; filesystem resolution (local or s3:// / gs://)
# ----------------------------------------------------------------------------------------------------


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI pyarrow understands (s3://, gs://, file://) → (filesystem, path)."""
    from packer.storage import filesystem

    return filesystem(uri)


def join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel


def atomic_write_bytes(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """A file appears whole under ``path`` or not at all.

    Local disk: write a temp file next to ``path``, fsync, rename it into place.
    Object stores (s3://, gs://) have no rename and need none: an object becomes visible only when
    its upload completes (one PUT, or one CompleteMultipartUpload for large objects), whole, and
    replaces the previous object whole; an upload cut short leaves no object. There are no
    directories either, so none are created. What a crash between objects leaves is handled one
    level up: each shard's sha256 is in its sidecar and in index.json, and index.json, written last,
    is the pack's commit marker (a pack without it is unfinished; readers and --resume verify
    checksums)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def table_to_parquet_bytes(table: pa.Table, row_group_rows: int = ROW_GROUP_ROWS) -> bytes:
    """Serialise deterministically: fixed writer options, no timestamps; pixel bytes uncompressed
    (memory-mappable, and natural-image patches barely compress), metadata zstd."""
    return table_to_parquet_buffer(table, row_group_rows).to_pybytes()


def table_to_parquet_buffer(table: pa.Table, row_group_rows: int = ROW_GROUP_ROWS) -> pa.Buffer:
    """:func:`table_to_parquet_bytes` without the final copy into ``bytes`` (same content); a
    ``pa.Buffer`` can be hashed and written directly (it supports the buffer protocol)."""
    sink = pa.BufferOutputStream()
    compression = {name: ("none" if name == "patches" else "zstd") for name in table.column_names}
    pq.write_table(
        table,
        sink,
        row_group_size=row_group_rows,
        compression=compression,
        use_dictionary=False,
        write_statistics=False,
        store_schema=True,
    )
    return sink.getvalue()


def sha256_bytes(data: bytes | pa.Buffer) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def dumps_index(index: dict[str, Any]) -> bytes:
    """index.json bytes: sorted keys, fixed indentation — byte-stable for equal content."""
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


# ----------------------------------------------------------------------------------------------------
# Reading: index validation and row-group iteration (used by trainer, stats, inspect, serve)
# ----------------------------------------------------------------------------------------------------

INDEX_REQUIRED = ("format", "version", "seq_len", "patch_size", "channels", "shards", "totals", "config")
TOTALS_KEYS = (
    "images_in",
    "images_packed",
    "images_rejected",
    "sequences",
    "real_tokens",
    "padding_tokens",
    "padding_fraction",
    "lower_bound_sequences",
)


def read_index(data_dir: str) -> dict[str, Any]:
    """Load and validate ``DIR/index.json``; DataError (one line) if missing, malformed or unknown."""
    fs, base = resolve_fs(data_dir)
    path = join(base, INDEX_FILE)
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except (FileNotFoundError, OSError):
        raise DataError(
            f"{data_dir}: no {INDEX_FILE} (not a navit pack, or the pack did not finish)"
        ) from None
    try:
        index = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{data_dir}/{INDEX_FILE}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(index, dict):
        raise DataError(f"{data_dir}/{INDEX_FILE}: expected a JSON object")
    if index.get("format") != FORMAT_NAME:
        raise DataError(
            f"{data_dir}/{INDEX_FILE}: format is {index.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    if index.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{data_dir}/{INDEX_FILE}: format version {index.get('version')!r} is not supported "
            f"(this navit reads version {FORMAT_VERSION})"
        )
    missing = [k for k in INDEX_REQUIRED if k not in index]
    if missing:
        raise DataError(f"{data_dir}/{INDEX_FILE}: missing keys {missing}")
    if isinstance(index["shards"], list):
        for entry in index["shards"]:
            if isinstance(entry, dict) and "file" in entry:
                check_shard_file(data_dir, entry["file"])
    return index


def check_shard_file(data_dir: str, file: Any) -> None:
    """Raise DataError unless a shard entry's ``file`` is a relative path inside the pack (as
    ``shards/shard-000000.parquet``): an index.json must not make a reader open files elsewhere
    (``../other/x.parquet``, ``/etc/...``, ``s3://...``)."""
    if not isinstance(file, str) or not file:
        raise DataError(f"{data_dir}/{INDEX_FILE}: shard file {file!r} is not a path")
    parts = file.replace("\\", "/").split("/")
    absolute = file.startswith(("/", "\\")) or "://" in file or (file[:1].isalpha() and file[1:2] == ":")
    if absolute or ".." in parts:
        raise DataError(
            f"{data_dir}/{INDEX_FILE}: shard file {file!r} is outside the pack "
            "(shard paths must be relative to the pack, without '..')"
        )


def verify_shards(data_dir: str, index: dict[str, Any]) -> list[str]:
    """Check every listed shard exists with its recorded sha256. Returns one message per problem."""
    fs, base = resolve_fs(data_dir)
    problems = []
    for entry in index["shards"]:
        path = join(base, entry["file"])
        try:
            digest = sha256_file(fs, path)
        except (FileNotFoundError, OSError):
            problems.append(f"{entry['file']}: missing")
            continue
        if digest != entry["sha256"]:
            problems.append(f"{entry['file']}: checksum mismatch (file changed or truncated)")
    return problems


def open_shard(data_dir: str, file: str, memory_map: bool = True) -> pq.ParquetFile:
    """Open one shard for row-group reads (memory-mapped when local)."""
    fs, base = resolve_fs(data_dir)
    path = join(base, file)
    if isinstance(fs, pafs.LocalFileSystem):
        return pq.ParquetFile(path, memory_map=memory_map)
    return pq.ParquetFile(fs.open_input_file(path))


def iter_row_groups(
    data_dir: str, file: str, columns: list[str] | None = None, start_row: int = 0
) -> Iterator[pa.Table]:
    """Yield a shard's row groups as tables (optionally only some columns), from ``start_row``."""
    pf = open_shard(data_dir, file)
    first = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n <= start_row:
            first += n
            continue
        table = pf.read_row_group(g, columns=columns)
        if start_row > first:
            table = table.slice(start_row - first)
        first += n
        yield table


def check_schema(schema: pa.Schema, index: dict[str, Any]) -> None:
    """Raise DataError unless a shard's schema is exactly the one its index implies."""
    expected = shard_schema(index["seq_len"], index["patch_size"], index.get("channels", CHANNELS))
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        raise DataError(
            "shard schema differs from the format this navit reads (was it written by navit pack?)"
        )
