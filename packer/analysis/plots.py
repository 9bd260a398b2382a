"""`navit stats --plot`: one multi-panel PNG of a pack's (or several packs') packing statistics.

This module owns the figure only; the numbers come from :mod:`packer.analysis.stats`. matplotlib runs with
the Agg backend (no display needed) and is imported inside the function so importing this module
is cheap. Several packs share each panel (one colour per pack, as numbered in the text table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from packer.analysis.load import PackData
from packer.analysis.stats import native_and_sampled
from packer.analysis.totals import drop_rate

DPI = 100
FIGSIZE = (18.0, 13.0)  # inches: 3 × 3 panels readable on a laptop screen at 100 dpi
SCATTER_MAX = 20_000  # points per pack in the native-vs-sampled scatter (a fixed random subset)


def _stairs(ax: Any, values: np.ndarray, edges: np.ndarray, label: str, color: Any) -> None:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    ax.stairs(counts, edges, label=label, color=color, linewidth=1.8, fill=False)


def plot_stats(packs: list[PackData], reports: list[dict[str, Any]], out: Path) -> None:
    """Write a 3 × 3 panel PNG: sequence fill, images/sequence, tokens/image, drop rate,
    native-vs-sampled size, aspect ratio, labels, rejections, and the first rows' segment layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colors = plt.get_cmap("tab10")
    tags = [f"[{i + 1}]" if len(packs) > 1 else "" for i in range(len(packs))]
    fig, axes = plt.subplots(3, 3, figsize=FIGSIZE, dpi=DPI)
    ax = axes.ravel()

    # 1. How full sequences are: real tokens per sequence as % of seq_len.
    edges = np.linspace(0, 100, 41)
    for i, (d, r) in enumerate(zip(packs, reports, strict=True)):
        fill = 100.0 * d.row_real / d.seq_len
        _stairs(ax[0], fill, edges, f"{tags[i]} padding {100 * r['padding_fraction']:.2f}%", colors(i))
    ax[0].set(title="Sequence fill", xlabel="real tokens per sequence (% of seq_len)", ylabel="sequences")
    ax[0].legend(fontsize=8, loc="upper left")

    # 2. Images per sequence.
    width = 0.8 / len(packs)
    for i, d in enumerate(packs):
        vals, counts = np.unique(d.row_images, return_counts=True)
        ax[1].bar(
            vals + (i - (len(packs) - 1) / 2) * width, counts, width=width, color=colors(i), label=tags[i]
        )
    ax[1].set(title="Images per sequence", xlabel="images in the sequence", ylabel="sequences")

    # 3. Tokens per image (kept).
    hi = max(int(d.seq_len) for d in packs)
    edges = np.linspace(0.5, hi + 0.5, min(hi, 60) + 1)
    for i, d in enumerate(packs):
        _stairs(ax[2], d.kept, edges, f"{tags[i]} mean {d.kept.mean() if len(d.kept) else 0:.1f}", colors(i))
    ax[2].set(title="Tokens per image (kept)", xlabel="tokens (patches)", ylabel="images")
    ax[2].legend(fontsize=8)

    # 4. Token drop rate.
    edges = np.linspace(0, 1, 21)
    for i, d in enumerate(packs):
        dr = drop_rate(d)
        _stairs(ax[3], dr, edges, f"{tags[i]} mean {dr.mean() if len(dr) else 0:.3f}", colors(i))
    ax[3].set(title="Token drop rate per image", xlabel="1 − kept / full tokens", ylabel="images")
    ax[3].legend(fontsize=8)

    # 5. Native versus sampled size (equal-area side), with the identity line.
    top = 1.0
    for i, d in enumerate(packs):
        pairs = native_and_sampled(d)
        if not pairs:
            continue
        native = np.sqrt(pairs["native_h"] * pairs["native_w"].astype(np.float64))
        sampled = np.sqrt(pairs["sampled_h"] * pairs["sampled_w"].astype(np.float64))
        if len(native) > SCATTER_MAX:
            pick = np.random.default_rng(0).choice(len(native), SCATTER_MAX, replace=False)
            native, sampled = native[pick], sampled[pick]
        ax[4].scatter(native, sampled, s=4, alpha=0.4, color=colors(i), label=tags[i] or None)
        top = max(top, float(native.max(initial=1)), float(sampled.max(initial=1)))
    ax[4].plot([0, top], [0, top], color="grey", linewidth=1, linestyle="--", label="sampled = native")
    ax[4].set(
        title="Resolution: native vs sampled",
        xlabel="native side √(h·w) (px)",
        ylabel="sampled side √(h·w) (px)",
    )
    ax[4].legend(fontsize=8)

    # 6. Aspect ratio (log scale), native dashed, sampled solid.
    edges = 2.0 ** np.linspace(-3, 3, 31)
    for i, d in enumerate(packs):
        _stairs(ax[5], d.grid_w / np.maximum(d.grid_h, 1), edges, f"{tags[i]} sampled", colors(i))
        pairs = native_and_sampled(d)
        if pairs:
            counts, _ = np.histogram(
                np.clip(pairs["native_w"] / pairs["native_h"], edges[0], edges[-1]), bins=edges
            )
            ax[5].stairs(counts, edges, color=colors(i), linestyle="--", label=f"{tags[i]} native")
    ax[5].set_xscale("log", base=2)
    ax[5].set(title="Aspect ratio", xlabel="width / height (log scale)", ylabel="images")
    ax[5].legend(fontsize=8)

    # 7. Per-label counts.
    names = sorted({k for r in reports for k in r["labels"]})
    y = np.arange(len(names))
    h = 0.8 / len(reports)
    for i, r in enumerate(reports):
        ax[6].barh(
            y + i * h, [r["labels"].get(n, 0) for n in names], height=h, color=colors(i), label=tags[i]
        )
    ax[6].set_yticks(y + 0.4 - h / 2, names, fontsize=8)
    ax[6].set(title="Packed images per label", xlabel="images (all epochs)")

    # 8. Rejected inputs by reason.
    reasons = sorted({k for r in reports for k in r["rejected_by_reason"]})
    if reasons:
        y = np.arange(len(reasons))
        for i, r in enumerate(reports):
            counts = [r["rejected_by_reason"].get(k, 0) for k in reasons]
            ax[7].barh(y + i * h, counts, height=h, color=colors(i), label=tags[i])
        ax[7].set_yticks(y + 0.4 - h / 2, [k[:40] for k in reasons], fontsize=8)
    else:
        ax[7].text(0.5, 0.5, "no rejected inputs", ha="center", va="center", transform=ax[7].transAxes)
    ax[7].set(title="Rejected inputs by reason", xlabel="inputs")

    # 9. Segment layout of the first rows of the first pack: one colour per segment, grey = padding.
    d0 = packs[0]
    layout = d0.layout
    if layout.size:
        k = int(layout.max())
        # tab10 without its grey (index 7), so no segment looks like padding.
        seg_colors = [colors(j) for j in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
        cmap = ListedColormap([(0.85, 0.85, 0.85)] + [seg_colors[j % 9] for j in range(max(k, 1))])
        ax[8].imshow(layout, aspect="auto", cmap=cmap, vmin=0, vmax=max(k, 1), interpolation="nearest")
    of = " of [1]" if len(packs) > 1 else ""
    ax[8].set(
        title=f"Segment layout, first {len(layout)} rows{of} (grey = padding)",
        xlabel="token position",
        ylabel="row",
    )

    head = "; ".join(
        f"{tags[i]} {r['dir']}: {r['sequences']:,} seqs × {r['seq_len']}, "
        f"padding {100 * r['padding_fraction']:.2f}%, +{100 * r['excess_over_lower_bound']:.2f}% over bound"
        for i, r in enumerate(reports)
    )
    fig.suptitle(f"navit stats — {head}", fontsize=11 if len(head) < 160 else 8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    tmp.replace(out)
