"""`navit inspect`: one packed row read back and turned into pictures of its images.

This module owns locating a row (global across shards, or within one shard), reconstructing each
segment's image from its kept patches and their (pos_h, pos_w) positions, the text summary of a row
and its PNG rendering (with each image's source crop box and flip from images.parquet). Dropped
tokens are painted :data:`DROPPED_RGB` (magenta: a colour natural images rarely have in flat 1-patch
blocks), so a picture shows exactly what the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from packer import schema
from packer.errors import DataError

DROPPED_RGB = (255, 0, 255)
DPI = 100


@dataclass
class SegmentView:
    """One image of a row: ``canvas`` (grid_h·p, grid_w·p, 3) uint8 with dropped patches filled,
    ``mask`` (grid_h, grid_w) bool, True where the token was kept."""

    segment: int  # 1-based, as in segment_ids
    image_id: int
    label: int
    grid_h: int
    grid_w: int
    kept: int
    full: int
    start: int  # first token of the segment in the row
    canvas: np.ndarray
    mask: np.ndarray
    # From images.parquet (None when not recorded): the crop (x0, y0, x1, y1) in upright source
    # pixels that was resized to the grid, and whether it was mirrored (pack-time augmentation).
    crop: tuple[int, int, int, int] | None = None
    hflip: bool | None = None


@dataclass
class RowView:
    """A packed row and its reconstructed images."""

    dir: str
    global_row: int
    shard: int  # position in index.json's shard list
    shard_file: str
    row_in_shard: int
    epoch: int
    seq_len: int
    patch_size: int
    segment_ids: np.ndarray  # (seq_len,) int16
    segments: list[SegmentView]
    class_names: list[str]

    @property
    def padding(self) -> int:
        return int((self.segment_ids == 0).sum())

    def label_name(self, label: int) -> str:
        if label < 0:
            return "unlabeled"
        return self.class_names[label] if label < len(self.class_names) else str(label)


def locate_row(index: dict[str, Any], row: int, shard: int | None = None) -> tuple[int, int]:
    """(shard position, row within that shard) of a global row, or of ``row`` within ``shard``.
    Global rows count across all shards in index.json order (epoch 0's shards first)."""
    entries = index["shards"]
    if shard is not None:
        if not 0 <= shard < len(entries):
            raise DataError(f"--shard {shard} is out of range: this pack has {len(entries)} shards (0..)")
        n = int(entries[shard]["rows"])
        if not 0 <= row < n:
            raise DataError(f"--row {row} is out of range: shard {shard} has {n} rows (0..{n - 1})")
        return shard, row
    rows = np.array([int(e["rows"]) for e in entries], np.int64)
    total = int(rows.sum())
    if not 0 <= row < total:
        raise DataError(f"--row {row} is out of range: this pack has {total} rows (0..{max(total - 1, 0)})")
    ends = np.cumsum(rows)
    k = int(np.searchsorted(ends, row, side="right"))
    return k, row - int(ends[k] - rows[k])


def reconstruct_row(
    patches: np.ndarray,
    segment_ids: np.ndarray,
    pos_h: np.ndarray,
    pos_w: np.ndarray,
    grid_h: np.ndarray,
    grid_w: np.ndarray,
    patch_size: int,
    fill: tuple[int, int, int] = DROPPED_RGB,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rebuild each segment's image from one row.

    patches (L, p·p·3) uint8; segment_ids / pos_h / pos_w (L,); grid_h / grid_w (k,) per segment.
    Returns, per segment in order, (canvas (grid_h·p, grid_w·p, 3) uint8, mask (grid_h, grid_w) bool).
    DataError if a token's position is outside its grid or two tokens claim one cell.
    """
    p = patch_size
    seq_len = len(segment_ids)
    tiles = np.asarray(patches, dtype=np.uint8).reshape(seq_len, p, p, 3)
    out = []
    for k in range(1, len(grid_h) + 1):
        gh, gw = int(grid_h[k - 1]), int(grid_w[k - 1])
        idx = np.flatnonzero(segment_ids == k)
        ph, pw = pos_h[idx].astype(np.int64), pos_w[idx].astype(np.int64)
        if len(idx) and (ph.min() < 0 or pw.min() < 0 or ph.max() >= gh or pw.max() >= gw):
            raise DataError(f"segment {k}: a token position lies outside its {gh}x{gw} grid")
        cells = ph * gw + pw
        if len(np.unique(cells)) != len(cells):
            raise DataError(f"segment {k}: two tokens have the same (pos_h, pos_w)")
        grid = np.empty((gh, gw, p, p, 3), np.uint8)
        grid[...] = np.asarray(fill, np.uint8)
        grid[ph, pw] = tiles[idx]
        mask = np.zeros((gh, gw), bool)
        mask[ph, pw] = True
        canvas = grid.transpose(0, 2, 1, 3, 4).reshape(gh * p, gw * p, 3)  # (gh·p, gw·p, 3)
        out.append((canvas, mask))
    return out


def read_row(data_dir: str, row: int, shard: int | None = None) -> RowView:
    """Read one packed row (its row group only) and reconstruct its images."""
    index = schema.read_index(data_dir)
    k, r = locate_row(index, row, shard)
    entry = index["shards"][k]
    try:
        table = next(schema.iter_row_groups(data_dir, entry["file"], start_row=r)).slice(0, 1)
    except (OSError, pa.ArrowException, StopIteration) as e:  # missing, truncated, damaged page
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{data_dir}/{entry['file']}: cannot read row {r} ({why})") from None
    schema.check_schema(table.schema, index)
    # Bounds before anything is sized from them (a flipped grid_h asked for a 24 GiB canvas).
    schema.check_rows(table, schema.RowLimits.from_index(index), f"{data_dir}/{entry['file']}", r)
    a = schema.table_to_arrays(table)
    p = int(index["patch_size"])
    seg = a["segment_ids"][0]
    views = reconstruct_row(
        a["patches"][0], seg, a["pos_h"][0], a["pos_w"][0], a["grid_h"][0], a["grid_w"][0], p
    )
    segments = []
    for i, (canvas, mask) in enumerate(views):
        idx = np.flatnonzero(seg == i + 1)
        segments.append(
            SegmentView(
                segment=i + 1,
                image_id=int(a["image_ids"][0][i]),
                label=int(a["labels"][0][i]),
                grid_h=int(a["grid_h"][0][i]),
                grid_w=int(a["grid_w"][0][i]),
                kept=len(idx),
                full=int(a["tokens_full"][0][i]),
                start=int(idx[0]) if len(idx) else -1,
                canvas=canvas,
                mask=mask,
            )
        )
    records = _augment_records(data_dir, int(entry.get("epoch", 0)), [s.image_id for s in segments])
    for s in segments:
        s.crop, s.hflip = records.get(s.image_id, (None, None))
    classes = index.get("classes") or (index.get("config") or {}).get("classes") or []
    before = sum(int(e["rows"]) for e in index["shards"][:k])
    return RowView(
        dir=data_dir,
        global_row=before + r,
        shard=k,
        shard_file=entry["file"],
        row_in_shard=r,
        epoch=int(entry.get("epoch", 0)),
        seq_len=int(index["seq_len"]),
        patch_size=p,
        segment_ids=seg,
        segments=segments,
        class_names=[str(c) for c in classes],
    )


def _augment_records(
    data_dir: str, epoch: int, image_ids: list[int]
) -> dict[int, tuple[tuple[int, int, int, int] | None, bool | None]]:
    """image_id → (crop box, hflip) of this epoch's images from images.parquet; empty if the file
    cannot be read (inspect still shows the row) — older packs read as whole images, unflipped."""
    if not image_ids:
        return {}
    import pyarrow.compute as pc

    try:
        t = schema.read_images(
            data_dir,
            columns=["image_id", *schema.AUGMENT_COLUMNS],
            filters=(pc.field("epoch") == epoch) & pc.field("image_id").isin(image_ids),
        )
    except DataError:
        return {}
    out: dict[int, tuple[tuple[int, int, int, int] | None, bool | None]] = {}
    for r in t.to_pylist():
        box = (r["crop_x0"], r["crop_y0"], r["crop_x1"], r["crop_y1"])
        ok = None not in box and min(box) >= 0  # type: ignore[operator]
        out[int(r["image_id"])] = (box if ok else None, r["hflip"])  # type: ignore[assignment]
    return out


def runs(segment_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(segment id, first token, length) of each run of equal ids, in order."""
    s = np.asarray(segment_ids)
    if len(s) == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s) != 0) + 1])
    ends = np.concatenate([starts[1:], [len(s)]])
    return [(int(s[a]), int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def summarize_row(v: RowView) -> str:
    """The textual summary `navit inspect` prints without --out."""
    lines = [
        f"row {v.global_row} of {v.dir}: {v.shard_file} row {v.row_in_shard}, epoch {v.epoch}, "
        f"seq_len {v.seq_len}, patch {v.patch_size}, {len(v.segments)} image(s)",
        f"  {'seg':>3}  {'tokens':>11}  {'image_id':>9}  {'label':<16} {'grid':>7}  {'kept/full':>10}  drop"
        + ("  source crop x0,y0-x1,y1  flip" if any(s.crop is not None for s in v.segments) else ""),
    ]
    for s in v.segments:
        span = f"{s.start}..{s.start + s.kept - 1}" if s.kept else "-"
        lab = f"{v.label_name(s.label)}" + (f" ({s.label})" if s.label >= 0 else "")
        aug = ""
        if s.crop is not None:
            aug = f"  crop {s.crop[0]},{s.crop[1]}-{s.crop[2]},{s.crop[3]}".ljust(26)
            aug += "  yes" if s.hflip else "  no"
        lines.append(
            f"  {s.segment:>3}  {span:>11}  {s.image_id:>9}  {lab:<16} {s.grid_h:>3}x{s.grid_w:<3}  "
            f"{f'{s.kept}/{s.full}':>10}  {1 - s.kept / max(s.full, 1):>4.0%}{aug}"
        )
    pad = v.padding
    where = f" at {v.seq_len - pad}..{v.seq_len - 1}" if pad else ""
    lines.append(f"  padding: {pad} tokens ({pad / v.seq_len:.1%}){where}")
    layout = " ".join(f"{'pad' if sid == 0 else sid}x{n}" for sid, _, n in runs(v.segment_ids))
    lines.append(f"  layout: {layout}")
    return "\n".join(lines)


def figure_size(n_segments: int) -> tuple[float, float, int, int]:
    """(width in, height in, image columns, image rows) of the inspect figure."""
    cols = max(1, min(n_segments, 5))
    rows = max(1, -(-n_segments // cols))
    return 2.8 * max(cols, 3), 3.0 * rows + 1.3, cols, rows


def render_row_png(v: RowView, out: Path) -> tuple[int, int]:
    """Write the images of the row (with label, grid and kept/full) above its segment-layout strip.
    Returns the PNG's (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    w_in, h_in, cols, rows = figure_size(len(v.segments))
    fig = plt.figure(figsize=(w_in, h_in), dpi=DPI)
    gs = fig.add_gridspec(rows + 1, cols, height_ratios=[3.0] * rows + [1.0], hspace=0.55)
    palette = plt.get_cmap("tab10")
    for i, s in enumerate(v.segments):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        ax.imshow(s.canvas, interpolation="nearest")
        ax.set_title(
            f"seg {s.segment}: {v.label_name(s.label)}\ngrid {s.grid_h}x{s.grid_w}, kept {s.kept}/{s.full}",
            fontsize=9,
            color=palette((s.segment - 1) % 10),
        )
        ax.set_xticks([])
        ax.set_yticks([])
        where = ""
        if s.crop is not None:
            where = f"\ncrop {s.crop[0]},{s.crop[1]}-{s.crop[2]},{s.crop[3]}" + (
                ", flipped" if s.hflip else ""
            )
        ax.set_xlabel(f"image {s.image_id}{where}", fontsize=8)
    if not v.segments:
        fig.add_subplot(gs[0, 0]).text(0.5, 0.5, "no images", ha="center")
    strip = fig.add_subplot(gs[rows, :])
    # Colour index 0 = padding (light grey), k = segment k (tab10 colour of k-1).
    n_seg = max(len(v.segments), 1)
    cmap = ListedColormap([(0.85, 0.85, 0.85)] + [palette(i % 10) for i in range(n_seg)])
    strip.imshow(
        v.segment_ids[None, :], aspect="auto", cmap=cmap, vmin=0, vmax=n_seg, interpolation="nearest"
    )
    for sid, start, n in runs(v.segment_ids):
        label = "pad" if sid == 0 else str(sid)
        strip.text(start + n / 2 - 0.5, 0, label, ha="center", va="center", fontsize=8)
    strip.set_yticks([])
    strip.set_xlabel(f"token position (0..{v.seq_len - 1}); grey = padding ({v.padding} tokens)")
    strip.set_title(
        f"segment layout of row {v.global_row} ({v.shard_file} row {v.row_in_shard})", fontsize=10
    )
    fig.suptitle(
        f"{v.dir}: row {v.global_row}, epoch {v.epoch} — magenta = dropped tokens", fontsize=11, y=0.995
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    tmp.replace(out)
    return round(w_in * DPI), round(h_in * DPI)
