"""The trainer's batch format: packed rows → a micro-batch of uint8/int tensors, and a stream's position.

- **Batch** (one micro-batch of ``B`` packed rows of ``L`` tokens; see :func:`collate_rows`)::

      patches     uint8 (B, L, p*p*3)   token-major pixels (the model normalises on the device)
      segment_ids int32 (B, L)          0 = padding, 1..k = k-th image of the row
      pos_hw      int32 (B, L, 2)       token's patch (row, col) in its image's grid
      grid_hw     int32 (B, L, 2)       its image's grid (grid_h, grid_w); 0 on padding
      labels      int64 (N,)            one per image, in the model's output order (row-major, then
                                        segment id); -1 = unlabeled (ignored by the loss)

- **Position** (:class:`DataPosition`): ``(epoch, rows consumed in it)`` of a rank's stream after a
  batch; a checkpoint stores it and a resumed stream starts there, exactly.

:class:`BatchSource` is what the training loop iterates; :mod:`trainer.data` opens one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from packer import schema

# ----------------------------------------------------------------------------------------------------
# Position and batches
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPosition:
    """Where a rank's endless row stream stands: ``rows`` rows of ``epoch`` consumed."""

    epoch: int = 0
    rows: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(int(d["epoch"]), int(d["rows"]))


@dataclass
class HostBatch:
    """A collated micro-batch on the host, plus the stream position after it and its counts."""

    tensors: dict[str, torch.Tensor]
    position: DataPosition
    images: int
    real_tokens: int
    tokens: int

    def to(self, device: torch.device, host_layout: bool = False) -> dict[str, Any]:
        """Copy to ``device``; non-blocking (overlaps compute) when the host memory is pinned.

        ``host_layout``: also pass the segment ids as a host numpy array (``segment_ids_host``), from
        which the model builds its layout without reading the device copy back (a host sync)."""
        out: dict[str, Any] = {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}
        if host_layout:
            out["segment_ids_host"] = self.tensors["segment_ids"].numpy()
        return out


@dataclass
class Rows:
    """Packed rows as numpy: patches (R, L, D) uint8, segment_ids/pos_h/pos_w (R, L) int, and per
    row the per-segment ``labels``, ``grid_h``, ``grid_w`` (1-D int arrays of length k_r)."""

    patches: np.ndarray
    segment_ids: np.ndarray
    pos_h: np.ndarray
    pos_w: np.ndarray
    labels: list[np.ndarray]
    grid_h: list[np.ndarray]
    grid_w: list[np.ndarray]

    def __len__(self) -> int:
        return self.patches.shape[0]

    @classmethod
    def from_arrow(cls, table: pa.Table | pa.RecordBatch) -> Rows:
        a = schema.table_to_arrays(table)
        return cls(
            a["patches"], a["segment_ids"], a["pos_h"], a["pos_w"], a["labels"], a["grid_h"], a["grid_w"]
        )

    def take(self, i: int) -> Rows:
        """Row ``i`` as its own 1-row Rows (a copy: the source buffers can be released)."""
        return Rows(
            self.patches[i : i + 1].copy(),
            self.segment_ids[i : i + 1].copy(),
            self.pos_h[i : i + 1].copy(),
            self.pos_w[i : i + 1].copy(),
            [self.labels[i]],
            [self.grid_h[i]],
            [self.grid_w[i]],
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        return Rows(
            np.concatenate([p.patches for p in parts]),
            np.concatenate([p.segment_ids for p in parts]),
            np.concatenate([p.pos_h for p in parts]),
            np.concatenate([p.pos_w for p in parts]),
            [x for p in parts for x in p.labels],
            [x for p in parts for x in p.grid_h],
            [x for p in parts for x in p.grid_w],
        )


def collate_rows(rows: Rows, position: DataPosition = DataPosition()) -> HostBatch:
    """Rows → the model's batch dict (see the module docstring) as CPU tensors."""
    seg = rows.segment_ids.astype(np.int32)  # (B, L)
    b, length = seg.shape
    pos_hw = np.stack([rows.pos_h, rows.pos_w], axis=-1).astype(np.int32)  # (B, L, 2)
    grid_hw = np.zeros((b, length, 2), dtype=np.int32)
    for r in range(b):
        # Per-segment grids with a 0 in front, indexed by segment id: padding (id 0) gets 0.
        gh = np.concatenate([[0], rows.grid_h[r]]).astype(np.int32)
        gw = np.concatenate([[0], rows.grid_w[r]]).astype(np.int32)
        grid_hw[r, :, 0] = gh[seg[r]]
        grid_hw[r, :, 1] = gw[seg[r]]
    labels = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows.labels]) if b else np.zeros(0)
    real = int(np.count_nonzero(seg))
    tensors = {
        "patches": torch.from_numpy(np.ascontiguousarray(rows.patches)),
        "segment_ids": torch.from_numpy(seg),
        "pos_hw": torch.from_numpy(pos_hw),
        "grid_hw": torch.from_numpy(grid_hw),
        "labels": torch.from_numpy(labels.astype(np.int64)),
    }
    return HostBatch(tensors, position, images=len(labels), real_tokens=real, tokens=b * length)


# ----------------------------------------------------------------------------------------------------
# Sources: the plug-in point for anything that yields batches + position
# ----------------------------------------------------------------------------------------------------


class BatchSource(Protocol):
    """What the training loop consumes: a rank's endless batches from a start position."""

    seq_len: int
    patch_size: int
    num_classes: int  # 0 when unknown
    description: str

    def batches(self, start: DataPosition) -> Iterator[HostBatch]: ...


def _host_collate(x: HostBatch) -> HostBatch:
    return x


def _pin(batch: HostBatch) -> HostBatch:
    batch.tensors = {k: v.pin_memory() for k, v in batch.tensors.items()}
    return batch
