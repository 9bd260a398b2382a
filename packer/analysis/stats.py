"""`navit stats`: packing-efficiency statistics of a pack directory, from metadata only.

This module owns reading a pack's *metadata* (the shard columns in ``schema.META_COLUMNS`` minus the
positions, never ``patches``; plus ``images.parquet``, ``rejected.jsonl`` and ``index.json``), the
report built from it, the cross-check of index.json against the shards, and the text renderings.
A million sequences is a few hundred MB of int16 segment ids, read column-wise, so it takes
seconds, not the minutes reading pixel bytes would.

Report keys shared with `navit plan --json` keep its names (seq_len, images_in, images_planned,
images_rejected, rejected_by_reason, sequences, real_tokens, padding_tokens, padding_fraction,
lower_bound_sequences, excess_over_lower_bound, images_per_seq, tokens_per_image).
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


def _read_shard_meta(pf: pq.ParquetFile, seq_len: int) -> dict[str, np.ndarray]:
    """Segment lengths, padding and per-segment lists of one shard, read column-wise."""
    table = pf.read(columns=STATS_COLUMNS)
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
    data_dir: str, index: dict[str, Any], k: int, entry: dict[str, Any]
) -> tuple[dict[str, np.ndarray] | None, list[str]]:
    """One shard's metadata summary (no per-token arrays kept beyond the layout head) and its
    problems against its index.json entry."""
    seq_len = int(index["seq_len"])
    name = entry.get("file", f"<shard {k}>")
    try:
        pf = schema.open_shard(data_dir, name)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
        return None, [f"{name}: listed in index.json but cannot be read ({_short(e)})"]
    try:
        schema.check_schema(pf.schema_arrow, index)
    except DataError as e:
        return None, [f"{name}: {e}"]
    m = _read_shard_meta(pf, seq_len)
    problems = []
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


def load_pack(data_dir: str) -> PackData:
    """Read a pack's metadata. Missing or unreadable shards become consistency problems, not errors;
    a missing or invalid index.json is a DataError (not a pack)."""
    index = schema.read_index(data_dir)
    seq_len, p = int(index["seq_len"]), int(index["patch_size"])
    problems: list[str] = []
    per_shard: list[dict[str, np.ndarray]] = []
    shard_no: list[int] = []
    shard_epoch: list[int] = []
    # Shards are read in a small thread pool: Parquet decoding and the numpy passes release the GIL.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        results = pool.map(lambda ke: _scan_shard(data_dir, index, *ke), enumerate(index["shards"]))
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
            return pq.read_table(f, columns=IMAGES_COLUMNS)
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


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------


def _lower_bound(d: PackData) -> int:
    """Σ over epochs of ⌈epoch tokens / seq_len⌉ (each epoch is packed on its own)."""
    lb = 0
    for e in np.unique(d.row_epoch):
        lb += -(-int(d.row_real[d.row_epoch == e].sum()) // d.seq_len)
    return lb


def _totals(d: PackData) -> dict[str, Any]:
    sequences = len(d.row_real)
    real = int(d.row_real.sum())
    padding = sequences * d.seq_len - real
    packed = len(d.kept)
    rejected = len(d.rejected)
    lb = _lower_bound(d)
    return {
        "images_in": packed + rejected,
        "images_packed": packed,
        "images_planned": packed,
        "images_rejected": rejected,
        "sequences": sequences,
        "real_tokens": real,
        "padding_tokens": padding,
        "padding_fraction": padding / (sequences * d.seq_len) if sequences else 0.0,
        "lower_bound_sequences": lb,
        "excess_over_lower_bound": (sequences - lb) / lb if lb else 0.0,
    }


def histogram(values: np.ndarray, edges: np.ndarray) -> dict[str, list]:
    """{"edges": [...], "counts": [...]} over ``edges`` (last bin closed); values outside are clipped."""
    v = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(v, bins=edges)
    return {"edges": [float(x) for x in edges], "counts": counts.astype(int).tolist()}


def value_counts(values: np.ndarray) -> dict[str, list]:
    """{"values": [...], "counts": [...]} of an integer array."""
    vals, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
    return {"values": vals.tolist(), "counts": counts.tolist()}


def distribution(values: np.ndarray, edges: np.ndarray | None = None) -> dict[str, Any]:
    """mean, min, percentiles, max and (with ``edges``) a histogram."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"count": 0}
    q = np.percentile(v, [10, 50, 90])
    out: dict[str, Any] = {
        "count": int(len(v)),
        "mean": float(v.mean()),
        "min": float(v.min()),
        "p10": float(q[0]),
        "p50": float(q[1]),
        "p90": float(q[2]),
        "max": float(v.max()),
    }
    if edges is not None:
        out["histogram"] = histogram(v, edges)
    return out


def _int_edges(hi: int, bins: int = 20) -> np.ndarray:
    """≤ ``bins`` integer-aligned bins covering 1..hi: edges 0.5, …, hi + 0.5."""
    step = max(1, math.ceil(hi / bins))
    return np.arange(0, hi + step, step, dtype=np.float64) + 0.5


def reason_group(reason: str) -> str:
    """A rejection reason without its per-file details (the text before the first ':')."""
    return reason.split(":", 1)[0].strip() or reason


def drop_rate(d: PackData) -> np.ndarray:
    """Per packed image: 1 − kept / full (0 = nothing dropped)."""
    return 1.0 - d.kept / np.maximum(d.full, 1)


def native_and_sampled(d: PackData) -> dict[str, np.ndarray]:
    """Paired native (images.parquet orig_h/orig_w) and sampled (grid·patch) sizes of packed images."""
    if d.images is None:
        return {}
    t = d.images
    h, w = _np(t.column("orig_h")), _np(t.column("orig_w"))
    gh, gw = _np(t.column("grid_h")), _np(t.column("grid_w"))
    ok = (_np(t.column("shard")) >= 0) & (h > 0) & (w > 0)
    p = d.patch_size
    return {
        "native_h": h[ok].astype(np.int64),
        "native_w": w[ok].astype(np.int64),
        "sampled_h": gh[ok].astype(np.int64) * p,
        "sampled_w": gw[ok].astype(np.int64) * p,
    }


def class_names(d: PackData) -> list[str]:
    classes = d.index.get("classes")
    if classes is None:
        classes = (d.index.get("config") or {}).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else []


def build_report(d: PackData) -> dict[str, Any]:
    """The stats report of one pack as a JSON-ready dict (see docs/stats.md for every key)."""
    L, p = d.seq_len, d.patch_size
    rep: dict[str, Any] = {"dir": d.dir, "seq_len": L, "patch_size": p}
    rep["max_images_per_seq"] = d.index.get("max_images_per_seq")
    rep["shards"] = len(d.index["shards"])
    rep["epochs"] = len(np.unique(d.row_epoch)) if len(d.row_epoch) else 0
    rep.update(_totals(d))
    reasons: dict[str, int] = {}
    for r in d.rejected:
        g = reason_group(str(r.get("reason", "unknown")))
        reasons[g] = reasons.get(g, 0) + 1
    rep["rejected_by_reason"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    ips = d.row_images
    rep["images_per_seq"] = {
        "mean": float(ips.mean()) if len(ips) else 0.0,
        "min": int(ips.min()) if len(ips) else 0,
        "max": int(ips.max()) if len(ips) else 0,
        "histogram": value_counts(ips),
    }
    rep["tokens_per_seq"] = distribution(d.row_real, _int_edges(L))
    rep["tokens_per_image"] = distribution(d.kept, _int_edges(L))
    rep["tokens_full_per_image"] = distribution(d.full, _int_edges(max(L, int(d.full.max(initial=1)))))
    dr = drop_rate(d)
    rep["drop_rate"] = distribution(dr, np.linspace(0.0, 1.0, 21))
    rep["dropped_tokens"] = int((d.full - d.kept).sum())
    # Resolution: equal-area side sqrt(h·w) in pixels, and aspect ratio w / h (log-spaced bins).
    pairs = native_and_sampled(d)
    side_s = np.sqrt((d.grid_h * p) * (d.grid_w * p).astype(np.float64))
    top = max(float(side_s.max(initial=p)), 1.0)
    res: dict[str, Any] = {}
    aspect_edges = 2.0 ** np.linspace(-3, 3, 25)
    aspect: dict[str, Any] = {"sampled": distribution(d.grid_w / np.maximum(d.grid_h, 1), aspect_edges)}
    if pairs:
        side_n = np.sqrt(pairs["native_h"] * pairs["native_w"].astype(np.float64))
        top = max(top, float(side_n.max(initial=1)))
        edges = np.linspace(0.0, top, 21)
        res["native_side_px"] = distribution(side_n, edges)
        res["sampled_side_px"] = distribution(side_s, edges)
        scale = np.sqrt(pairs["sampled_h"] * pairs["sampled_w"] / (pairs["native_h"] * pairs["native_w"]))
        res["scale_sampled_over_native"] = distribution(scale, 2.0 ** np.linspace(-4, 2, 25))
        aspect["native"] = distribution(pairs["native_w"] / pairs["native_h"], aspect_edges)
    else:
        res["sampled_side_px"] = distribution(side_s, np.linspace(0.0, top, 21))
    res["sampled_max_side_px"] = distribution(np.maximum(d.grid_h, d.grid_w) * p)
    rep["resolution"] = res
    rep["aspect_ratio"] = aspect
    names = class_names(d)
    labels: dict[str, int] = {}
    for v, c in zip(*np.unique(d.label, return_counts=True), strict=True):
        key = "unlabeled" if v < 0 else (names[v] if v < len(names) else str(int(v)))
        labels[key] = int(c)
    rep["labels"] = labels
    rep["per_epoch"] = _per_epoch(d)
    rep["consistency"] = {"ok": not d.problems, "problems": list(d.problems)}
    return rep


def _per_epoch(d: PackData) -> list[dict[str, Any]]:
    out = []
    shard_epochs = np.array([int(e.get("epoch", 0)) for e in d.index["shards"]], np.int64)
    for e in np.unique(d.row_epoch):
        rows = d.row_epoch == e
        segs = d.epoch == e
        n, real = int(rows.sum()), int(d.row_real[rows].sum())
        lb = -(-real // d.seq_len)
        out.append(
            {
                "epoch": int(e),
                "shards": int((shard_epochs == e).sum()),
                "sequences": n,
                "images": int(segs.sum()),
                "real_tokens": real,
                "padding_tokens": n * d.seq_len - real,
                "padding_fraction": (n * d.seq_len - real) / (n * d.seq_len) if n else 0.0,
                "lower_bound_sequences": lb,
                "excess_over_lower_bound": (n - lb) / lb if lb else 0.0,
                "images_per_seq_mean": float(d.row_images[rows].mean()) if n else 0.0,
                "drop_rate_mean": float(drop_rate(d)[segs].mean()) if segs.any() else 0.0,
            }
        )
    return out


def compute_stats(data_dir: str) -> dict[str, Any]:
    """Load a pack's metadata and build its report."""
    return build_report(load_pack(data_dir))


# ----------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------


def _bar(count: int, most: int, width: int = 30) -> str:
    return "#" * max(1 if count else 0, round(width * count / most)) if most else ""


def _int_bin(lo: float, hi: float) -> str:
    a, b = math.ceil(lo), math.floor(hi)
    return str(a) if a == b else f"{a}..{b}"


def _hist_lines(h: dict[str, list], fmt: str = "{:.0f}") -> list[str]:
    most = max(h["counts"], default=0)
    if "values" in h:
        labels = [str(v) for v in h["values"]]
    else:
        e = h["edges"]
        if all(x % 1 == 0.5 for x in e):  # integer bins (edges at k + 0.5): label them lo..hi
            labels = [_int_bin(e[i], e[i + 1]) for i in range(len(h["counts"]))]
        else:
            labels = [f"{fmt.format(e[i])}-{fmt.format(e[i + 1])}" for i in range(len(h["counts"]))]
    width = max((len(s) for s in labels), default=0)
    return [
        f"    {lab:>{width}} {c:>9,} {_bar(c, most)}"
        for lab, c in zip(labels, h["counts"], strict=True)
        if c or "values" in h
    ]


def _dist_line(name: str, dist: dict[str, Any], unit: str = "", fmt: str = "{:.1f}") -> str:
    if not dist.get("count"):
        return f"  {name}: none"
    f = fmt.format
    return (
        f"  {name}: mean {f(dist['mean'])}{unit}  min {f(dist['min'])}  p50 {f(dist['p50'])}  "
        f"p90 {f(dist['p90'])}  max {f(dist['max'])}"
    )


def render_text(rep: dict[str, Any]) -> str:
    """A one-screen human report of one pack."""
    lines = [
        f"pack {rep['dir']}: seq_len {rep['seq_len']}, patch {rep['patch_size']}, "
        f"{rep['shards']} shards, {rep['epochs']} epoch(s)",
        f"  images: {rep['images_in']:,} in, {rep['images_packed']:,} packed, "
        f"{rep['images_rejected']:,} rejected",
        f"  sequences: {rep['sequences']:,}  (lower bound {rep['lower_bound_sequences']:,}, "
        f"excess {100 * rep['excess_over_lower_bound']:.3f}%)",
        f"  tokens: {rep['real_tokens']:,} real, {rep['padding_tokens']:,} padding "
        f"({100 * rep['padding_fraction']:.3f}% padding), {rep['dropped_tokens']:,} dropped",
    ]
    ips = rep["images_per_seq"]
    lines.append(f"  images per sequence: mean {ips['mean']:.2f}  min {ips['min']}  max {ips['max']}")
    lines += _hist_lines(ips["histogram"])
    lines.append(_dist_line("tokens per image (kept)", rep["tokens_per_image"]))
    if rep["tokens_per_image"].get("histogram"):
        lines += _hist_lines(rep["tokens_per_image"]["histogram"])
    lines.append(_dist_line("token drop rate", rep["drop_rate"], fmt="{:.3f}"))
    if rep["drop_rate"].get("count") and rep["drop_rate"]["max"] > 0:
        lines += _hist_lines(rep["drop_rate"]["histogram"], fmt="{:.2f}")
    res = rep["resolution"]
    if "native_side_px" in res:
        lines.append(_dist_line("native side sqrt(h*w)", res["native_side_px"], " px"))
    lines.append(_dist_line("sampled side sqrt(h*w)", res["sampled_side_px"], " px"))
    if "scale_sampled_over_native" in res:
        lines.append(_dist_line("scale sampled/native", res["scale_sampled_over_native"], fmt="{:.3f}"))
    for k, v in rep["aspect_ratio"].items():
        lines.append(_dist_line(f"aspect w/h ({k})", v, fmt="{:.2f}"))
    if rep["labels"]:
        lines.append("  labels: " + ", ".join(f"{k} {v:,}" for k, v in rep["labels"].items()))
    if rep["rejected_by_reason"]:
        lines.append("  rejected: " + "; ".join(f"{k} {v}" for k, v in rep["rejected_by_reason"].items()))
    if len(rep["per_epoch"]) > 1:
        lines.append("  per epoch:  epoch  shards  sequences     images  padding   excess")
        for e in rep["per_epoch"]:
            lines.append(
                f"              {e['epoch']:>5} {e['shards']:>7} {e['sequences']:>10,} {e['images']:>10,} "
                f"{100 * e['padding_fraction']:>7.3f}% {100 * e['excess_over_lower_bound']:>7.3f}%"
            )
    lines += render_consistency(rep)
    return "\n".join(lines)


def render_consistency(rep: dict[str, Any]) -> list[str]:
    c = rep["consistency"]
    if c["ok"]:
        return ["  consistency: OK (index.json, images.parquet and rejected.jsonl agree with the shards)"]
    out = [f"WARNING: {rep['dir']}: index.json / images.parquet disagree with the shards:"]
    out += [f"  - {p}" for p in c["problems"]]
    return out


COMPARE_ROWS = (
    ("seq_len", "{:,}"),
    ("images_in", "{:,}"),
    ("images_packed", "{:,}"),
    ("images_rejected", "{:,}"),
    ("sequences", "{:,}"),
    ("lower_bound_sequences", "{:,}"),
    ("excess_over_lower_bound", "{:.3%}"),
    ("real_tokens", "{:,}"),
    ("padding_tokens", "{:,}"),
    ("padding_fraction", "{:.3%}"),
    ("images_per_seq.mean", "{:.2f}"),
    ("images_per_seq.max", "{:,}"),
    ("tokens_per_image.mean", "{:.1f}"),
    ("drop_rate.mean", "{:.3f}"),
    ("resolution.sampled_side_px.mean", "{:.1f}"),
    ("epochs", "{:,}"),
    ("consistency.ok", "{}"),
)


def _get(rep: dict[str, Any], dotted: str) -> Any:
    v: Any = rep
    for part in dotted.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def render_comparison(reps: list[dict[str, Any]]) -> str:
    """Several packs side by side: one column per directory."""
    heads = [f"[{i + 1}]" for i in range(len(reps))]
    rows = [("", heads)]
    for key, fmt in COMPARE_ROWS:
        cells = []
        for r in reps:
            v = _get(r, key)
            cells.append("-" if v is None else fmt.format(v))
        rows.append((key, cells))
    kw = max(len(k) for k, _ in rows)
    cw = [max(len(cells[i]) for _, cells in rows) for i in range(len(reps))]
    lines = [
        f"{k:<{kw}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, cw, strict=True)) for k, cells in rows
    ]
    lines += [f"{h} {r['dir']}" for h, r in zip(heads, reps, strict=True)]
    for r in reps:
        if not r["consistency"]["ok"]:
            lines += render_consistency(r)
    return "\n".join(lines)
