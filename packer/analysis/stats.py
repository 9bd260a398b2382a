"""`navit stats`: packing-efficiency statistics of a pack directory, from metadata only.

This module owns the report (:func:`build_report`, :func:`compute_stats`) and the distribution helpers
the plan report shares; reading and cross-checking a pack is :mod:`packer.analysis.load`, the totals
:mod:`packer.analysis.totals`, the text renderings :mod:`packer.analysis.render`.

Report keys shared with `navit plan --json` keep its names (seq_len, images_in, images_planned,
images_rejected, rejected_by_reason, sequences, real_tokens, padding_tokens, padding_fraction,
lower_bound_sequences, excess_over_lower_bound, images_per_seq, tokens_per_image).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from packer.analysis.load import PackData, _np, load_pack
from packer.analysis.totals import _per_epoch, _totals, drop_rate


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


def compute_stats(data_dir: str, verify: bool = True) -> dict[str, Any]:
    """Load a pack's metadata (and check its shards' sha256, with ``verify``) and build its report."""
    return build_report(load_pack(data_dir, verify))
