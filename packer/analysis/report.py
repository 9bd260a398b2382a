"""The plan report: how well a plan packs (padding, bound, images per sequence, token distributions).

Key names and distribution helpers are shared with ``navit stats`` (:mod:`packer.analysis.stats`), so
``navit plan --json`` and ``navit stats --json`` agree where they overlap. :func:`report_from_arrays`
works on plain arrays (anything that knows per-image and per-sequence counts can use it);
:func:`plan_report` feeds it a :class:`~packer.plan.types.Plan`; :func:`render_text` prints one report
and :func:`render_table` several side by side (one per seq_len).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from packer.analysis import render
from packer.analysis.stats import distribution, reason_group, value_counts
from packer.config import PackConfig
from packer.plan.binpack import lower_bound
from packer.plan.sources import Skipped
from packer.plan.types import Plan


def _int_edges(hi: int, bins: int = 20) -> np.ndarray:
    """≤ ``bins`` integer-aligned bins covering 1..hi (edges at k + 0.5), as packer.analysis.stats uses."""
    step = max(1, math.ceil(hi / bins))
    return np.arange(0, hi + step, step, dtype=np.float64) + 0.5


def report_from_arrays(
    *,
    seq_len: int,
    patch_size: int,
    max_images_per_seq: int,
    seq_offsets: np.ndarray,
    seq_members: np.ndarray,
    n_full: np.ndarray,
    n_kept: np.ndarray,
    grid_h: np.ndarray,
    grid_w: np.ndarray,
    orig_h: np.ndarray | None = None,
    orig_w: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    classes: Sequence[str] = (),
    rejected_reasons: Sequence[str] = (),
    skipped: Sequence[Skipped] = (),
) -> dict[str, Any]:
    """The report of one packing. Per-image arrays are (n,), in the order seq_members refers to."""
    L = int(seq_len)
    n_kept = np.asarray(n_kept, np.int64)
    n_full = np.asarray(n_full, np.int64)
    offsets = np.asarray(seq_offsets, np.int64)
    members = np.asarray(seq_members, np.int64)
    S = len(offsets) - 1
    per_seq_images = np.diff(offsets)  # (S,)
    seq_of = np.repeat(np.arange(S), per_seq_images)
    per_seq_tokens = np.bincount(seq_of, weights=n_kept[members], minlength=S).astype(np.int64)  # (S,)
    real = int(n_kept.sum())
    padding = S * L - real
    lb = lower_bound(n_kept, L) if len(n_kept) else 0
    planned, rej = len(n_kept), len(rejected_reasons)
    rep: dict[str, Any] = {
        "seq_len": L,
        "patch_size": int(patch_size),
        "max_images_per_seq": int(max_images_per_seq),
        "images_in": planned + rej,
        "images_planned": planned,
        "images_rejected": rej,
        "sequences": S,
        "real_tokens": real,
        "padding_tokens": padding,
        "padding_fraction": padding / (S * L) if S else 0.0,
        "lower_bound_sequences": lb,
        "excess_over_lower_bound": (S - lb) / lb if lb else 0.0,
    }
    reasons: dict[str, int] = {}
    for r in rejected_reasons:
        g = reason_group(r)
        reasons[g] = reasons.get(g, 0) + 1
    rep["rejected_by_reason"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    skip: dict[str, int] = {}
    for s in skipped:
        g = reason_group(s.reason)
        skip[g] = skip.get(g, 0) + 1
    rep["files_skipped"] = len(skipped)
    rep["skipped_by_reason"] = dict(sorted(skip.items(), key=lambda kv: (-kv[1], kv[0])))
    rep["images_per_seq"] = {
        "mean": float(per_seq_images.mean()) if S else 0.0,
        "min": int(per_seq_images.min()) if S else 0,
        "max": int(per_seq_images.max()) if S else 0,
        "histogram": value_counts(per_seq_images),
    }
    rep["tokens_per_seq"] = distribution(per_seq_tokens, _int_edges(L))
    rep["tokens_per_image"] = distribution(n_kept, _int_edges(L))
    rep["tokens_full_per_image"] = distribution(n_full, _int_edges(max(L, int(n_full.max(initial=1)))))
    drop = 1.0 - n_kept / np.maximum(n_full, 1)
    rep["drop_rate"] = distribution(drop, np.linspace(0.0, 1.0, 21))
    rep["drop_rate_mean"] = float(drop.mean()) if len(drop) else 0.0
    rep["dropped_tokens"] = int((n_full - n_kept).sum())
    gh, gw = np.asarray(grid_h, np.int64), np.asarray(grid_w, np.int64)
    p = int(patch_size)
    side_s = np.sqrt((gh * p) * (gw * p).astype(np.float64))
    top = max(float(side_s.max(initial=p)), 1.0)
    res: dict[str, Any] = {}
    aspect_edges = 2.0 ** np.linspace(-3, 3, 25)
    aspect: dict[str, Any] = {"sampled": distribution(gw / np.maximum(gh, 1), aspect_edges)}
    if orig_h is not None and orig_w is not None and len(gh):
        oh, ow = np.asarray(orig_h, np.float64), np.asarray(orig_w, np.float64)
        side_n = np.sqrt(oh * ow)
        top = max(top, float(side_n.max(initial=1)))
        edges = np.linspace(0.0, top, 21)
        res["native_side_px"] = distribution(side_n, edges)
        res["sampled_side_px"] = distribution(side_s, edges)
        res["scale_sampled_over_native"] = distribution(side_s / side_n, 2.0 ** np.linspace(-4, 2, 25))
        aspect["native"] = distribution(ow / oh, aspect_edges)
    else:
        res["sampled_side_px"] = distribution(side_s, np.linspace(0.0, top, 21))
    res["sampled_max_side_px"] = distribution(np.maximum(gh, gw) * p)
    rep["resolution"] = res
    rep["aspect_ratio"] = aspect
    lab: dict[str, int] = {}
    if labels is not None and len(labels):
        for v, c in zip(*np.unique(np.asarray(labels), return_counts=True), strict=True):
            name = "unlabeled" if v < 0 else (classes[v] if v < len(classes) else str(int(v)))
            lab[name] = int(c)
    rep["labels"] = lab
    return rep


def plan_report(
    plan: Plan, cfg: PackConfig, *, skipped: Sequence[Skipped] = (), algorithm_seconds: float | None = None
) -> dict[str, Any]:
    """The report of a plan, with the resolved config, seed, epoch and packer recorded."""
    rep = report_from_arrays(
        seq_len=plan.seq_len,
        patch_size=plan.patch_size,
        max_images_per_seq=cfg.packing.max_images_per_seq,
        seq_offsets=plan.seq_offsets,
        seq_members=plan.seq_members,
        n_full=plan.n_full,
        n_kept=plan.n_kept,
        grid_h=plan.grid_h,
        grid_w=plan.grid_w,
        orig_h=plan.orig_h,
        orig_w=plan.orig_w,
        labels=plan.label,
        classes=plan.classes,
        rejected_reasons=[r.reason for r in plan.rejected],
        skipped=skipped,
    )
    rep["epoch"] = plan.epoch
    rep["packer"] = cfg.packing.packer
    rep["exact_fill"] = bool(cfg.packing.exact_fill)
    if algorithm_seconds is not None:
        rep["plan_seconds"] = algorithm_seconds
    rep["seed"] = cfg.seed
    rep["config"] = cfg.model_dump(mode="json")
    rep["config_fingerprint"] = cfg.fingerprint()
    return rep


# ----------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------


def render_text(rep: dict[str, Any]) -> str:
    """A one-screen human report of one plan (same layout as ``navit stats``)."""
    head = f"plan: seq_len {rep['seq_len']}, patch {rep['patch_size']}"
    if "packer" in rep:
        head += f", packer {rep['packer']}" + (" + exact-fill" if rep.get("exact_fill") else "")
    if "seed" in rep:
        head += f", seed {rep['seed']}, epoch {rep.get('epoch', 0)}"
    lines = [
        head,
        f"  images: {rep['images_in']:,} in, {rep['images_planned']:,} planned, "
        f"{rep['images_rejected']:,} rejected"
        + (f"  ({rep['files_skipped']:,} other files skipped)" if rep.get("files_skipped") else ""),
        f"  sequences: {rep['sequences']:,}  (lower bound {rep['lower_bound_sequences']:,}, "
        f"excess {100 * rep['excess_over_lower_bound']:.3f}%)",
        f"  tokens: {rep['real_tokens']:,} real, {rep['padding_tokens']:,} padding "
        f"({100 * rep['padding_fraction']:.3f}% padding), {rep['dropped_tokens']:,} dropped",
    ]
    ips = rep["images_per_seq"]
    lines.append(f"  images per sequence: mean {ips['mean']:.2f}  min {ips['min']}  max {ips['max']}")
    lines += render._hist_lines(ips["histogram"])
    lines.append(render._dist_line("tokens per image (kept)", rep["tokens_per_image"]))
    if rep["tokens_per_image"].get("histogram"):
        lines += render._hist_lines(rep["tokens_per_image"]["histogram"])
    lines.append(render._dist_line("token drop rate", rep["drop_rate"], fmt="{:.3f}"))
    res = rep["resolution"]
    if "native_side_px" in res:
        lines.append(render._dist_line("native side sqrt(h*w)", res["native_side_px"], " px"))
    lines.append(render._dist_line("sampled side sqrt(h*w)", res["sampled_side_px"], " px"))
    for k, v in rep["aspect_ratio"].items():
        lines.append(render._dist_line(f"aspect w/h ({k})", v, fmt="{:.2f}"))
    if rep["labels"]:
        lines.append("  labels: " + ", ".join(f"{k} {v:,}" for k, v in rep["labels"].items()))
    if rep["rejected_by_reason"]:
        lines.append("  rejected: " + "; ".join(f"{k} {v}" for k, v in rep["rejected_by_reason"].items()))
    if rep.get("skipped_by_reason"):
        lines.append("  skipped: " + "; ".join(f"{k} {v}" for k, v in rep["skipped_by_reason"].items()))
    return "\n".join(lines)


def render_table(reps: Sequence[dict[str, Any]]) -> str:
    """One aligned line per report (e.g. one per seq_len), for choosing a sequence length."""
    cols = [
        ("seq_len", "seq_len", "{:,}"),
        ("sequences", "sequences", "{:,}"),
        ("lower bd", "lower_bound_sequences", "{:,}"),
        ("excess", "excess_over_lower_bound", "{:.3%}"),
        ("padding", "padding_fraction", "{:.3%}"),
        ("real tok", "real_tokens", "{:,}"),
        ("img/seq", None, None),
        ("drop", "drop_rate_mean", "{:.3f}"),
    ]
    rows = []
    for r in reps:
        row = []
        for _, key, fmt in cols:
            if key is None:
                ips = r["images_per_seq"]
                row.append(f"{ips['mean']:.1f} [{ips['min']}-{ips['max']}]")
            else:
                row.append(fmt.format(r[key]))
        rows.append(row)
    widths = [max(len(c[0]), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    out = ["  ".join(c[0].rjust(w) for c, w in zip(cols, widths, strict=True))]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)
