"""What every reader checks in the shard rows it reads (part of the shard contract; re-exported by
:mod:`packer.schema`, which owns the format).

- **Bounds** (:func:`row_problem`): the metadata of a row must describe a row navit could have
  written — per-segment lists of one length, 1 ≤ grid sides, ``grid_h·grid_w = tokens_full`` ≤ the
  pack's ``max_tokens_per_image``, labels in ``-1..classes-1``, segment ids ``0..k``, each listed
  segment ≥ 1 token and ≤ ``tokens_full``, token positions inside their image's grid. A reader
  trusts these numbers to size things (inspect's canvas, the model's head), so one flipped byte in
  a value must be an error, not a 24 GiB allocation. numpy passes over the row group: cheap.
- **Row CRC32s** (:func:`row_crc32`): ``navit serve`` sends the CRC32 of each row it streams
  (computed from rows read with Parquet page checksums verified) in the Flight batch's
  ``app_metadata``; the Flight client recomputes them (:func:`check_crc_metadata`).

Imports neither Ray nor torch (the trainer uses it).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from packer.errors import DataError

# Bounds when the pack does not give one (a Flight stream carries only its geometry): generous,
# but small enough that nothing sized by them can exhaust memory.
MAX_TOKENS_PER_IMAGE = 1 << 20
MAX_LABEL = (1 << 24) - 1
PER_SEGMENT = ("image_ids", "labels", "grid_h", "grid_w", "tokens_full")
CRC_KEY = "navit_row_crc32"


@dataclass(frozen=True)
class RowLimits:
    """The bounds a row's metadata must respect (see the module docstring)."""

    seq_len: int
    max_images_per_seq: int | None = None
    max_tokens_per_image: int = MAX_TOKENS_PER_IMAGE
    num_classes: int | None = None  # labels < num_classes; None: < MAX_LABEL + 1

    @classmethod
    def from_index(cls, index: dict[str, Any]) -> RowLimits:
        packing = (index.get("config") or {}).get("packing") or {}
        classes = index.get("classes") or None
        return cls(
            seq_len=int(index["seq_len"]),
            max_images_per_seq=_int_or_none(index.get("max_images_per_seq")),
            max_tokens_per_image=_int_or_none(packing.get("max_tokens_per_image")) or MAX_TOKENS_PER_IMAGE,
            num_classes=len(classes) if isinstance(classes, list) else None,
        )

    def label_bound(self) -> int:
        return self.num_classes if self.num_classes else MAX_LABEL + 1


def _int_or_none(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _column(batch: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    col = batch.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _values(arr: pa.Array) -> np.ndarray:
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)


def label_problem(labels: np.ndarray, limits: RowLimits) -> str | None:
    """A label outside ``-1..classes-1`` (the trainer sizes its head from the largest label)."""
    bad = (labels < -1) | (labels >= limits.label_bound())
    return _label_text(int(labels[np.flatnonzero(bad)[0]]), limits) if bad.any() else None


def _label_text(label: int, limits: RowLimits) -> str:
    classes = f"{limits.num_classes} classes" if limits.num_classes else "no class list"
    return f"label {label} is out of range (-1..{limits.label_bound() - 1}: {classes})"


def row_problem(batch: pa.Table | pa.RecordBatch, limits: RowLimits, first_row: int = 0) -> str | None:
    """The first bounds violation in ``batch`` (any subset of the shard columns; what is absent is
    not checked) as one line naming the row (``first_row`` + its index), or None."""
    names = set(batch.schema.names)
    n = batch.num_rows
    if n == 0:
        return None
    lists: dict[str, np.ndarray] = {}
    n_seg: np.ndarray | None = None
    for name in PER_SEGMENT:
        if name not in names:
            continue
        arr = _column(batch, name)
        if arr.null_count:
            return f"{name} has null entries"
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        if n_seg is None:
            n_seg = lengths
        elif not np.array_equal(lengths, n_seg):
            r = int(np.flatnonzero(lengths != n_seg)[0])
            return f"row {first_row + r}: {name} lists {lengths[r]} segments, image_ids {n_seg[r]}"
        lists[name] = _values(arr)
    if n_seg is None:
        n_seg = np.zeros(n, np.int64)
    cap = limits.max_images_per_seq or limits.seq_len
    if len(n_seg) and int(n_seg.max()) > cap:
        r = int(np.argmax(n_seg))
        return f"row {first_row + r}: {n_seg[r]} images listed, more than {cap}"
    ends = np.cumsum(n_seg)

    def where(i: int) -> str:  # per-segment index → "row R segment S"
        r = int(np.searchsorted(ends, i, side="right"))
        return f"row {first_row + r} segment {i - int(ends[r] - n_seg[r]) + 1}"

    if {"grid_h", "grid_w", "tokens_full"} <= lists.keys():
        gh, gw, full = lists["grid_h"], lists["grid_w"], lists["tokens_full"]
        bad = (gh < 1) | (gw < 1) | (full > limits.max_tokens_per_image) | (gh * gw != full)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return (
                f"{where(i)}: grid {gh[i]}x{gw[i]} with tokens_full {full[i]} (must be the grid's "
                f"product, at most {limits.max_tokens_per_image})"
            )
    if "labels" in lists:
        lab = lists["labels"]
        bad = (lab < -1) | (lab >= limits.label_bound())
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return f"{where(i)}: {_label_text(int(lab[i]), limits)}"
    if "image_ids" in lists and (lists["image_ids"] < 0).any():
        i = int(np.flatnonzero(lists["image_ids"] < 0)[0])
        return f"{where(i)}: image id {lists['image_ids'][i]} is negative"
    if "segment_ids" in names:
        return _token_problem(batch, names, lists, n_seg, limits, first_row)
    return None


def _token_problem(
    batch: pa.Table | pa.RecordBatch,
    names: set[str],
    lists: dict[str, np.ndarray],
    n_seg: np.ndarray,
    limits: RowLimits,
    first_row: int,
) -> str | None:
    n, length = batch.num_rows, limits.seq_len
    seg = _values(_column(batch, "segment_ids")).reshape(n, length)
    bad_rows = (seg < 0).any(axis=1) | (seg > n_seg[:, None]).any(axis=1)
    if bad_rows.any():
        r = int(np.flatnonzero(bad_rows)[0])
        return f"row {first_row + r}: segment ids outside 0..{n_seg[r]} (the images it lists)"
    starts = np.cumsum(n_seg) - n_seg
    real = seg > 0
    where = (starts[:, None] + seg - 1)[real]  # each real token's index into the per-segment lists
    kept = np.bincount(where, minlength=int(n_seg.sum()))
    full = lists.get("tokens_full")
    bad = (kept < 1) | ((kept > full) if full is not None else False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        r = int(np.searchsorted(np.cumsum(n_seg), i, side="right"))
        most = f" of {full[i]}" if full is not None else ""
        return f"row {first_row + r} segment {i - int(starts[r]) + 1}: {kept[i]} tokens{most}"
    for name, grid in (("pos_h", "grid_h"), ("pos_w", "grid_w")):
        if name in names and grid in lists:
            pos = _values(_column(batch, name)).reshape(n, length)[real]
            side = lists[grid][where]
            off = (pos < 0) | (pos >= side)
            if off.any():
                r = int(np.nonzero(real)[0][np.flatnonzero(off)[0]])
                return f"row {first_row + r}: a token's {name} lies outside its image's {grid}"
    return None


def check_rows(batch: pa.Table | pa.RecordBatch, limits: RowLimits, where: str, first_row: int = 0) -> None:
    """Raise DataError (one line: ``where: problem``) unless every row is within bounds."""
    problem = row_problem(batch, limits, first_row)
    if problem:
        raise DataError(f"{where}: {problem} (corrupt shard metadata)")


# ----------------------------------------------------------------------------------------------------
# Row CRC32s carried by Flight batches
# ----------------------------------------------------------------------------------------------------


def row_crc32(batch: pa.Table | pa.RecordBatch) -> list[int]:
    """CRC32 of each row's content: its patch bytes, then segment_ids, pos_h, pos_w (int16, little
    endian), then each per-segment list as int64 little endian, in the schema's column order."""
    n = batch.num_rows
    cols: list[Any] = []
    for name in batch.schema.names:
        arr = _column(batch, name)
        if name == "patches":
            width = arr.type.byte_width
            data = np.frombuffer(arr.buffers()[1], np.uint8, count=(arr.offset + n) * width)
            cols.append(data[arr.offset * width :].reshape(n, width))
        elif pa.types.is_fixed_size_list(arr.type):
            cols.append(_values(arr).astype("<i2").reshape(n, arr.type.list_size))
        else:
            offsets = arr.offsets.to_numpy()
            values = arr.values.to_numpy(zero_copy_only=False).astype("<i8")
            cols.append([values[offsets[r] : offsets[r + 1]] for r in range(n)])
    out = []
    for r in range(n):
        crc = 0
        for c in cols:
            crc = zlib.crc32(np.ascontiguousarray(c[r]).tobytes(), crc)
        out.append(crc)
    return out


def crc_metadata(batch: pa.Table | pa.RecordBatch) -> bytes:
    """The ``app_metadata`` a Flight batch carries: ``{"navit_row_crc32": [crc, ...]}``."""
    return json.dumps({CRC_KEY: row_crc32(batch)}, separators=(",", ":")).encode()


def check_crc_metadata(batch: pa.RecordBatch, metadata: bytes | None) -> str | None:
    """None when ``metadata`` carries this batch's row CRC32s (or no CRCs at all: a server from
    before they were sent); otherwise what does not match."""
    if not metadata:
        return None
    try:
        sent = json.loads(bytes(metadata)).get(CRC_KEY)
    except (ValueError, AttributeError):
        return "the batch's metadata is not navit's"
    if sent is None:
        return None
    have = row_crc32(batch)
    if len(sent) != len(have):
        return f"the batch has {len(have)} rows, its CRC32 list {len(sent)}"
    bad = [r for r, (a, b) in enumerate(zip(sent, have, strict=True)) if a != b]
    return (
        f"row {bad[0]} of the batch fails its CRC32 ({len(bad)} row(s) corrupted in transit)" if bad else None
    )
