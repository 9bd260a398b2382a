"""A small but valid pack directory written from numpy images with known pixels, for the tests of
`navit stats` and `navit inspect` (the real `navit pack` is tested elsewhere).

Everything a test needs to compute expected values by hand lives in the inputs: each
:class:`FixImage` is the already-resized image (its height and width are whole patches), which of
its tokens are kept, its label and its native size; ``epochs`` says which images share each packed
row. The writer lays each row out exactly as the shard contract says (images end to end, kept
tokens in row-major order, padding at the tail, zero pixels) through :mod:`packer.schema`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from packer import schema


@dataclass
class FixImage:
    """One input image: ``pixels`` (grid_h·p, grid_w·p, 3) uint8 at its planned size."""

    pixels: np.ndarray
    label: int = -1
    orig_hw: tuple[int, int] | None = None  # native (h, w); default: the planned size
    keep: np.ndarray | None = None  # kept token indices (row-major in the grid); None = all
    path: str | None = None

    def grid(self, p: int) -> tuple[int, int]:
        return self.pixels.shape[0] // p, self.pixels.shape[1] // p

    def kept(self, p: int) -> np.ndarray:
        gh, gw = self.grid(p)
        return np.arange(gh * gw) if self.keep is None else np.sort(np.asarray(self.keep))

    def patches(self, p: int) -> np.ndarray:
        """(grid_h·grid_w, p·p·3) uint8, row-major tokens, each patch in (row, col, channel) order."""
        gh, gw = self.grid(p)
        x = self.pixels.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4)  # (gh, gw, p, p, 3)
        return x.reshape(gh * gw, p * p * 3)


def random_image(rng: np.random.Generator, grid_h: int, grid_w: int, p: int, **kw: Any) -> FixImage:
    return FixImage(rng.integers(0, 256, (grid_h * p, grid_w * p, 3), dtype=np.uint8), **kw)


def write_pack(
    out: Path,
    images: list[FixImage],
    epochs: list[list[list[int]]],
    seq_len: int,
    patch_size: int,
    shard_rows: int = 3,
    rejected: list[tuple[str, str]] | None = None,
    classes: list[str] | None = None,
    max_images_per_seq: int = 8,
    row_group_rows: int = 2,
) -> dict[str, Any]:
    """Write a pack to ``out``: ``epochs[e][r]`` lists the image indices (= image ids) of row r of
    epoch e. ``rejected`` (path, reason) inputs get the ids after the images and are rejected in
    every epoch. Returns the index written to index.json."""
    p = patch_size
    tb = schema.token_bytes(p)
    rejected = rejected or []
    entries: list[dict[str, Any]] = []
    img_rows: list[dict[str, Any]] = []
    rej_lines: list[str] = []
    shard_no = 0
    sequences = real = 0
    packed = 0
    tokens_per_epoch: list[int] = []
    per_epoch: list[dict[str, Any]] = []
    for epoch, rows in enumerate(epochs):
        epoch_tokens = 0
        for start in range(0, len(rows), shard_rows):
            chunk = rows[start : start + shard_rows]
            n = len(chunk)
            patches = np.zeros((n, seq_len, tb), np.uint8)
            seg = np.zeros((n, seq_len), np.int16)
            pos_h = np.zeros((n, seq_len), np.int16)
            pos_w = np.zeros((n, seq_len), np.int16)
            ids, labels, gh_l, gw_l, full_l = [], [], [], [], []
            shard_real = shard_images = 0
            for r, members in enumerate(chunk):
                t = 0
                for k, i in enumerate(members, start=1):
                    im = images[i]
                    gh, gw = im.grid(p)
                    kept = im.kept(p)
                    m = len(kept)
                    assert t + m <= seq_len, "fixture row longer than seq_len"
                    patches[r, t : t + m] = im.patches(p)[kept]
                    seg[r, t : t + m] = k
                    pos_h[r, t : t + m] = kept // gw
                    pos_w[r, t : t + m] = kept % gw
                    t += m
                    oh, ow = im.orig_hw or (gh * p, gw * p)
                    img_rows.append(
                        {
                            "epoch": epoch,
                            "image_id": i,
                            "path": im.path or f"img{i}.png",
                            "label": im.label,
                            "orig_h": oh,
                            "orig_w": ow,
                            "grid_h": gh,
                            "grid_w": gw,
                            "n_tokens_full": gh * gw,
                            "n_tokens": m,
                            "shard": shard_no,
                            "row": r,
                            "segment": k,
                            "rejected_reason": None,
                        }
                    )
                shard_real += t
                shard_images += len(members)
                ids.append(np.array(members, np.int64))
                labels.append(np.array([images[i].label for i in members], np.int64))
                gh_l.append(np.array([images[i].grid(p)[0] for i in members], np.int32))
                gw_l.append(np.array([images[i].grid(p)[1] for i in members], np.int32))
                full_l.append(np.array([np.prod(images[i].grid(p)) for i in members], np.int32))
            table = schema.rows_to_table(
                schema.PackedRows(patches, seg, pos_h, pos_w, ids, labels, gh_l, gw_l, full_l), seq_len, p
            )
            data = schema.table_to_parquet_bytes(table, row_group_rows)
            name = schema.shard_file_name(shard_no)
            schema.atomic_write_bytes(*schema.resolve_fs(str(out / name)), data)
            entries.append(
                {
                    "file": name,
                    "rows": n,
                    "images": shard_images,
                    "real_tokens": shard_real,
                    "sha256": schema.sha256_bytes(data),
                    "epoch": epoch,
                }
            )
            shard_no += 1
            sequences += n
            real += shard_real
            packed += shard_images
            epoch_tokens += shard_real
        tokens_per_epoch.append(epoch_tokens)
        per_epoch.append(
            {
                "epoch": epoch,
                "sequences": len(rows),
                "real_tokens": epoch_tokens,
                "images_packed": sum(len(r) for r in rows),
                "lower_bound_sequences": -(-epoch_tokens // seq_len),
            }
        )
        for j, (path, reason) in enumerate(rejected):
            img_rows.append(
                {
                    "epoch": epoch,
                    "image_id": len(images) + j,
                    "path": path,
                    "label": -1,
                    "orig_h": -1,
                    "orig_w": -1,
                    "grid_h": -1,
                    "grid_w": -1,
                    "n_tokens_full": -1,
                    "n_tokens": -1,
                    "shard": -1,
                    "row": -1,
                    "segment": -1,
                    "rejected_reason": reason,
                }
            )
            rej_lines.append(json.dumps({"path": path, "reason": reason, "epoch": epoch}))
    pq.write_table(pa.Table.from_pylist(img_rows, schema=schema.IMAGES_SCHEMA), out / schema.IMAGES_FILE)
    (out / schema.REJECTED_FILE).write_text("".join(line + "\n" for line in rej_lines))
    padding = sequences * seq_len - real
    totals = {
        "images_in": packed + len(rejected) * len(epochs),
        "images_packed": packed,
        "images_rejected": len(rejected) * len(epochs),
        "sequences": sequences,
        "real_tokens": real,
        "padding_tokens": padding,
        "padding_fraction": padding / (sequences * seq_len) if sequences else 0.0,
        "lower_bound_sequences": sum(-(-t // seq_len) for t in tokens_per_epoch),
    }
    index: dict[str, Any] = {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "seq_len": seq_len,
        "patch_size": p,
        "channels": schema.CHANNELS,
        "max_images_per_seq": max_images_per_seq,
        "epochs": len(epochs),
        "seed": 0,
        "config": {},
        "shards": entries,
        "totals": totals,
        "per_epoch": per_epoch,
    }
    if classes is not None:
        index["classes"] = classes
    (out / schema.INDEX_FILE).write_bytes(schema.dumps_index(index))
    return index
