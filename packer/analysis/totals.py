"""A pack's totals recomputed from its shards' metadata: the numbers index.json must agree with
(:func:`packer.analysis.load.load_pack` checks them) and the report's per-epoch table.

The lower bound is Σ over epochs of ⌈epoch tokens / seq_len⌉ (each epoch is packed on its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # load imports this module; the annotation needs no runtime import
    from packer.analysis.load import PackData


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


def drop_rate(d: PackData) -> np.ndarray:
    """Per packed image: 1 − kept / full (0 = nothing dropped)."""
    return 1.0 - d.kept / np.maximum(d.full, 1)


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
