"""`navit stats` as text: one pack's report (:func:`render_text`), or packs side by side
(:func:`render_comparison`). Works on the report dict of :func:`packer.analysis.stats.build_report`.
"""

from __future__ import annotations

import math
from typing import Any

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
