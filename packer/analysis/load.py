"""Reading a pack's metadata for `navit stats`, and cross-checking index.json against the shards.

:func:`load_pack` reads the shard columns in ``STATS_COLUMNS`` (segment ids and the per-segment
lists; never ``patches``) plus ``images.parquet``, ``rejected.jsonl`` and ``index.json`` into a
:class:`PackData` of flat numpy arrays; the ``_check_*`` functions record every disagreement in
``PackData.problems``. A million sequences is a few hundred MB of int16 segment ids, read
column-wise, so it takes seconds, not the minutes reading pixel bytes would.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from packer import schema
from packer.analysis.totals import _per_epoch, _totals
from packer.errors import DataError

# Shard columns stats reads: segment ids give every segment's kept length and the padding; the
# per-segment lists give ids, labels, grids and full lengths. pos_h/pos_w and patches are not needed.
STATS_COLUMNS = ["segment_ids", *schema.SEGMENT_COLUMNS]


IMAGES_COLUMNS = [
    "epoch",
    "image_id",
    "label",
    "orig_h",
    "orig_w",
    "grid_h",
    "grid_w",
    "n_tokens_full",
    "n_tokens",
    "shard",
    "row",
    "segment",
    "rejected_reason",
]


# How many disagreements of one kind are spelled out before "... and N more".
MAX_LISTED = 5


# Shards read at once (threads; capped so a big machine does not thrash one disk).
READ_THREADS = min(4, os.cpu_count() or 1)


# Rows of segment layout kept for the plot's layout strip.
LAYOUT_ROWS = 24


@dataclass
class PackData:
    """A pack's metadata as flat numpy arrays (all epochs, in pack order).

    Per row (R rows): ``row_real`` real tokens, ``row_images`` segments, ``row_epoch``.
    Per packed segment (N segments): ``image_id``, ``label``, ``grid_h``, ``grid_w``, ``full``
    (tokens before dropping), ``kept`` (segment length), ``shard``, ``row`` (within its shard),
    ``segment`` (1-based), ``epoch``.
    """

    dir: str
    index: dict[str, Any]
    seq_len: int
    patch_size: int
    row_real: np.ndarray
    row_images: np.ndarray
    row_epoch: np.ndarray
    image_id: np.ndarray
    label: np.ndarray
    grid_h: np.ndarray
    grid_w: np.ndarray
    full: np.ndarray
    kept: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    segment: np.ndarray
    epoch: np.ndarray
    images: pa.Table | None  # images.parquet (IMAGES_COLUMNS), None if missing
    rejected: list[dict[str, Any]]  # rejected.jsonl lines
    layout: np.ndarray  # (≤LAYOUT_ROWS, seq_len) int16: segment ids of the first rows
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _np(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False)


def _flat(col: pa.ChunkedArray) -> np.ndarray:
    """A (fixed-size) list column → its values, offsets respected."""
    return _np(col.combine_chunks().flatten())


def _read_shard_meta(table: pa.Table, seq_len: int) -> dict[str, np.ndarray]:
    """Segment lengths, padding and per-segment lists of one shard (its STATS_COLUMNS)."""
    n = table.num_rows
    seg = _flat(table.column("segment_ids")).reshape(n, seq_len)  # (R, L) int16
    n_seg = _np(pc.list_value_length(table.column("image_ids"))).astype(np.int64)  # (R,)
    k = int(max(int(n_seg.max(initial=0)), int(seg.max(initial=0)))) + 1
    # counts[r, j]: tokens of segment j in row r (j = 0 is padding); one bincount for the shard.
    keys = (np.arange(n, dtype=np.int64)[:, None] * k + seg.astype(np.int64)).reshape(-1)
    counts = np.bincount(keys, minlength=n * k).reshape(n, k)
    listed = np.arange(1, k)[None, :] <= n_seg[:, None]  # (R, k-1): segment j+1 is listed in row r
    out = {
        "seg": seg,
        "n_seg": n_seg,
        "counts": counts,
        "kept": counts[:, 1:][listed],  # row-major = the flattened order of the per-segment lists
        "unlisted_tokens": counts[:, 1:][~listed].sum() if k > 1 else 0,
    }
    for name in schema.SEGMENT_COLUMNS:
        out[name] = _flat(table.column(name))
    return out


def _layout_problems(seg: np.ndarray, counts: np.ndarray, n_seg: np.ndarray) -> int:
    """Rows whose segment ids are not 1, 1, …, 2, 2, …, k, 0, 0 (contiguous, in order, padding last)
    or that list a segment with no token."""
    big = np.where(seg == 0, np.iinfo(np.int16).max, seg).astype(np.int32)
    not_ordered = (np.diff(big, axis=1) < 0).any(axis=1)
    # Each listed segment must hold ≥ 1 token and its tokens must form one run (a run per change).
    changes = (np.diff(seg.astype(np.int32), axis=1) != 0).sum(axis=1) + 1
    expected_runs = n_seg + (counts[:, 0] > 0)
    empty = np.zeros(len(seg), bool)
    if counts.shape[1] > 1:
        listed = np.arange(1, counts.shape[1])[None, :] <= n_seg[:, None]
        empty = ((counts[:, 1:] == 0) & listed).any(axis=1)
    return int((not_ordered | empty | (changes != expected_runs)).sum())


def _scan_shard(
    data_dir: str, index: dict[str, Any], k: int, entry: dict[str, Any], verify: bool
) -> tuple[dict[str, np.ndarray] | None, list[str]]:
    """One shard's metadata summary (no per-token arrays kept beyond the layout head) and its
    problems against its index.json entry (with ``verify``, its sha256 too)."""
    seq_len = int(index["seq_len"])
    name = entry.get("file", f"<shard {k}>")
    corrupt = []
    if verify and "sha256" in entry:  # the only check that sees every byte (pixels included)
        fs, base = schema.resolve_fs(data_dir)
        try:
            if schema.sha256_file(fs, schema.join(base, name)) != entry["sha256"]:
                corrupt = [f"{name}: checksum mismatch (the file changed or is corrupt since it was packed)"]
        except (FileNotFoundError, OSError):
            pass  # reported below as unreadable
    try:
        pf = schema.open_shard(data_dir, name)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
        return None, [f"{name}: listed in index.json but cannot be read ({_short(e)})"]
    try:
        schema.check_schema(pf.schema_arrow, index)
    except DataError as e:
        return None, [*corrupt, f"{name}: {e}"]
    try:  # page CRC32s are verified as the columns are read (schema.open_shard)
        table = pf.read(columns=STATS_COLUMNS)
    except (OSError, pa.ArrowException) as e:
        return None, [*corrupt, f"{name}: cannot be read ({_short(e)})"]
    # Bounds first: a corrupt grid or label must not reach the histograms (or size an array).
    problem = schema.row_problem(table, schema.RowLimits.from_index(index))
    if problem:
        return None, [*corrupt, f"{name}: {problem} (corrupt shard metadata)"]
    m = _read_shard_meta(table, seq_len)
    problems = corrupt
    rows = len(m["n_seg"])
    images = int(m["n_seg"].sum())
    m["row_real"] = seq_len - m["counts"][:, 0]
    real = int(m["row_real"].sum())
    for key, have in (("rows", rows), ("images", images), ("real_tokens", real)):
        if key in entry and int(entry[key]) != have:
            problems.append(f"{name}: index.json says {key}={entry[key]}, the shard has {have}")
    bad_layout = _layout_problems(m["seg"], m["counts"], m["n_seg"])
    if bad_layout:
        problems.append(
            f"{name}: {bad_layout} row(s) whose segment_ids are not contiguous 1..k with padding last"
        )
    if m["unlisted_tokens"]:
        problems.append(f"{name}: {m['unlisted_tokens']} tokens carry a segment id with no image listed")
    m["head"] = m.pop("seg")[:LAYOUT_ROWS].copy()
    del m["counts"]
    return m, problems


def load_pack(data_dir: str, verify: bool = True) -> PackData:
    """Read a pack's metadata. Missing, unreadable or corrupt shards become consistency problems,
    not errors; a missing or invalid index.json is a DataError (not a pack). ``verify`` also checks
    every shard's sha256 against index.json (reads every byte once; without it a flipped pixel byte
    goes unseen, as stats reads no pixel)."""
    index = schema.read_index(data_dir)
    seq_len, p = int(index["seq_len"]), int(index["patch_size"])
    problems: list[str] = []
    per_shard: list[dict[str, np.ndarray]] = []
    shard_no: list[int] = []
    shard_epoch: list[int] = []
    # Shards are read in a small thread pool: Parquet decoding and the numpy passes release the GIL.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        results = pool.map(lambda ke: _scan_shard(data_dir, index, *ke, verify), enumerate(index["shards"]))
        for k, (m, shard_problems) in enumerate(results):
            problems += shard_problems
            if m is None:
                continue
            per_shard.append(m)
            # Shard numbers in images.parquet are the shard's position in index.json (= its file number).
            shard_no.append(k)
            shard_epoch.append(int(index["shards"][k].get("epoch", 0)))

    def cat(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate([m[key] for m in per_shard]).astype(dtype) if per_shard else np.zeros(0, dtype)

    n_seg = cat("n_seg", np.int64)
    rows_per = [len(m["n_seg"]) for m in per_shard]
    row_real = cat("row_real", np.int64)
    row_epoch = np.repeat(np.array(shard_epoch, np.int64), rows_per)
    row_in_shard = np.concatenate([np.arange(r) for r in rows_per]) if per_shard else n_seg
    row_shard = np.repeat(np.array(shard_no, np.int64), rows_per)
    starts = np.cumsum(n_seg) - n_seg
    segment = np.arange(int(n_seg.sum())) - np.repeat(starts, n_seg) + 1
    layout = np.concatenate([m["head"] for m in per_shard])[:LAYOUT_ROWS] if per_shard else np.zeros((0, 0))
    data = PackData(
        dir=data_dir,
        index=index,
        seq_len=seq_len,
        patch_size=p,
        row_real=row_real.astype(np.int64),
        row_images=n_seg,
        row_epoch=row_epoch,
        image_id=cat("image_ids", np.int64),
        label=cat("labels", np.int64),
        grid_h=cat("grid_h", np.int64),
        grid_w=cat("grid_w", np.int64),
        full=cat("tokens_full", np.int64),
        kept=cat("kept", np.int64),
        shard=np.repeat(row_shard, n_seg),
        row=np.repeat(row_in_shard, n_seg),
        segment=segment.astype(np.int64),
        epoch=np.repeat(row_epoch, n_seg),
        images=_read_images(data_dir, problems),
        rejected=_read_rejected(data_dir, problems),
        layout=np.array(layout, dtype=np.int16),
        problems=problems,
    )
    _check_segments(data)
    _check_images(data)
    _check_totals(data)
    return data


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _read_images(data_dir: str, problems: list[str]) -> pa.Table | None:
    fs, base = schema.resolve_fs(data_dir)
    path = schema.join(base, schema.IMAGES_FILE)
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f, columns=IMAGES_COLUMNS, page_checksum_verification=True)
    except (FileNotFoundError, OSError, pa.ArrowInvalid, KeyError) as e:
        problems.append(f"{schema.IMAGES_FILE}: cannot be read ({_short(e)})")
        return None


def _read_rejected(data_dir: str, problems: list[str]) -> list[dict[str, Any]]:
    fs, base = schema.resolve_fs(data_dir)
    path = schema.join(base, schema.REJECTED_FILE)
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read().decode()
    except (FileNotFoundError, OSError) as e:
        problems.append(f"{schema.REJECTED_FILE}: cannot be read ({_short(e)})")
        return []
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{schema.REJECTED_FILE}: line {n} is not JSON")
            continue
        out.append(rec if isinstance(rec, dict) else {"reason": str(rec)})
    return out


# ----------------------------------------------------------------------------------------------------
# Consistency: index.json against the shards, images.parquet against the shards
# ----------------------------------------------------------------------------------------------------


def _listed(msg: str, bad: np.ndarray, describe: Any) -> str:
    idx = np.flatnonzero(bad)
    shown = ", ".join(describe(i) for i in idx[:MAX_LISTED])
    more = f" and {len(idx) - MAX_LISTED} more" if len(idx) > MAX_LISTED else ""
    return f"{msg}: {len(idx)} ({shown}{more})"


def _check_segments(d: PackData) -> None:
    where = lambda i: f"shard {d.shard[i]} row {d.row[i]} segment {d.segment[i]}"  # noqa: E731
    bad = d.grid_h * d.grid_w != d.full
    if bad.any():
        d.problems.append(_listed("segments whose tokens_full != grid_h*grid_w", bad, where))
    bad = (d.kept < 1) | (d.kept > d.full)
    if bad.any():
        d.problems.append(_listed("segments whose kept length is not in 1..tokens_full", bad, where))
    if len(d.image_id):
        order = np.lexsort((d.image_id, d.epoch))
        e, i = d.epoch[order], d.image_id[order]
        dup = (e[1:] == e[:-1]) & (i[1:] == i[:-1])
        if dup.any():
            ids = i[1:][dup]
            d.problems.append(
                f"images packed more than once in one epoch: {len(ids)} (ids {ids[:5].tolist()})"
            )


def _check_images(d: PackData) -> None:
    """images.parquet must place exactly the shards' segments, with the same ids, grids and lengths,
    and list as many rejections as rejected.jsonl."""
    if d.images is None:
        return
    t = d.images
    col = {name: _np(t.column(name)).astype(np.int64) for name in IMAGES_COLUMNS[:-1]}
    reason = t.column("rejected_reason")
    packed = col["shard"] >= 0
    n_rej = int(t.num_rows - packed.sum())
    if pc.sum(pc.is_null(pc.filter(reason, pa.array(~packed)))).as_py():
        d.problems.append(f"{schema.IMAGES_FILE}: rejected rows without a rejected_reason")
    if n_rej != len(d.rejected):
        d.problems.append(
            f"{schema.IMAGES_FILE} lists {n_rej} rejected inputs, "
            f"{schema.REJECTED_FILE} has {len(d.rejected)}"
        )
    # Sort both sides by place (shard, row, segment) and compare field by field.
    ours = np.lexsort((d.segment, d.row, d.shard))
    sel = np.flatnonzero(packed)
    theirs = sel[np.lexsort((col["segment"][sel], col["row"][sel], col["shard"][sel]))]
    if len(theirs) != len(ours):
        d.problems.append(
            f"{schema.IMAGES_FILE} places {len(theirs)} images, the shards hold {len(ours)} segments"
        )
    n = min(len(ours), len(theirs))
    a, b = ours[:n], theirs[:n]
    pairs = (
        ("shard", d.shard, "shard"),
        ("row", d.row, "row"),
        ("segment", d.segment, "segment"),
        ("image_id", d.image_id, "image_id"),
        ("epoch", d.epoch, "epoch"),
        ("grid_h", d.grid_h, "grid_h"),
        ("grid_w", d.grid_w, "grid_w"),
        ("tokens_full", d.full, "n_tokens_full"),
        ("kept tokens", d.kept, "n_tokens"),
    )
    bad = np.zeros(n, bool)
    for _, ours_v, theirs_name in pairs:
        bad |= ours_v[a] != col[theirs_name][b]
    if bad.any():
        d.problems.append(
            _listed(
                f"{schema.IMAGES_FILE} placements that disagree with the shards",
                bad,
                lambda i: (
                    f"shard {d.shard[a[i]]} row {d.row[a[i]]} segment {d.segment[a[i]]}: "
                    f"image {d.image_id[a[i]]} in the shard, "
                    f"image {col['image_id'][b[i]]} in {schema.IMAGES_FILE}"
                ),
            )
        )


def _check_totals(d: PackData) -> None:
    totals = d.index.get("totals") or {}
    mine = _totals(d)
    for key in (*schema.TOTALS_KEYS, "images_planned", "excess_over_lower_bound"):
        if key not in totals or key not in mine:
            continue
        have, claim = mine[key], totals[key]
        if isinstance(have, float) or isinstance(claim, float):
            same = math.isclose(float(have), float(claim), rel_tol=1e-9, abs_tol=1e-12)
        else:
            same = int(have) == int(claim)
        if not same:
            d.problems.append(f"index.json totals.{key} = {claim}, the shards give {have}")
    if "sequences" not in totals:
        d.problems.append("index.json has no totals.sequences")
    if "shards" in totals and int(totals["shards"]) != len(d.index["shards"]):
        d.problems.append(f"index.json totals.shards = {totals['shards']}, it lists {len(d.index['shards'])}")
    # index.json's optional per-epoch totals (written by navit pack) against the shards.
    claimed = {int(e.get("epoch", -1)): e for e in d.index.get("per_epoch") or [] if isinstance(e, dict)}
    for e in _per_epoch(d):
        c = claimed.get(e["epoch"])
        if c is None:
            continue
        for key, have in (
            ("sequences", e["sequences"]),
            ("real_tokens", e["real_tokens"]),
            ("images_packed", e["images"]),
            ("lower_bound_sequences", e["lower_bound_sequences"]),
        ):
            if key in c and int(c[key]) != have:
                d.problems.append(
                    f"index.json per_epoch[{e['epoch']}].{key} = {c[key]}, the shards give {have}"
                )
