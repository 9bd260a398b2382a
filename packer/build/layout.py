"""One shard's worth of work, from plan to Arrow table — pure functions, no Ray, no I/O but reads.

:func:`shard_tasks` cuts an epoch's :class:`~packer.plan.types.Plan` into shard tasks: small JSON
strings, each naming a fixed group of consecutive sequences and everything needed to build them
(paths, keys, planned grids, kept-token counts, labels, image ids, layout, and the crop box and
flip of each image when augmenting). :func:`build_shard`
executes one task: it decodes each image into its kept patches (:mod:`packer.build.decode`), lays each
sequence's images end to end, zero-pads the tail and returns the shard table plus small metadata.

A shard depends only on its task and the config, never on other shards or on which worker ran it:
that is what makes shards byte-identical across worker counts and lets ``--resume`` rebuild any one.

Images that fail at pack time (a readable header but corrupt pixels) are recorded as rejected and
their segment is *removed* from the row: later images of the row move forward and are renumbered,
so segments stay 1..k contiguous with padding at the tail. The row count of the shard never changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from packer import members as containers
from packer import schema
from packer.build.decode import DecodeError, decode_tokens
from packer.config import PackConfig
from packer.plan.types import Plan


@dataclass
class ShardResult:
    """What building one shard produced, besides its bytes.

    placements: [image_id, row, segment] of every packed image (segment is 1-based);
    rejections: [image_id, reason] of images that failed at pack time.
    """

    shard: int
    epoch: int
    rows: int
    images: int
    real_tokens: int
    placements: list[list[int]] = field(default_factory=list)
    rejections: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "epoch": self.epoch,
            "rows": self.rows,
            "images": self.images,
            "real_tokens": self.real_tokens,
            "placements": self.placements,
            "rejections": self.rejections,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardResult:
        return cls(**d)


def shard_ranges(num_sequences: int, shard_rows: int) -> list[tuple[int, int]]:
    """[start, stop) sequence ranges of an epoch's shards: fixed groups of ``shard_rows``."""
    return [(s, min(s + shard_rows, num_sequences)) for s in range(0, num_sequences, shard_rows)]


def shard_tasks(plan: Plan, seed: int, shard_rows: int, first_shard: int = 0) -> list[str]:
    """An epoch's plan → one JSON task per shard (sorted keys: equal plans give equal strings).

    Shards are numbered from ``first_shard`` (numbering continues across epochs)."""
    tasks = []
    for k, (s0, s1) in enumerate(shard_ranges(plan.num_sequences, shard_rows)):
        rows = []
        for s in range(s0, s1):
            members = []
            for i in plan.sequence(s).tolist():
                member = {
                    "id": int(plan.image_id[i]),
                    "path": plan.path[i],
                    "key": plan.key[i],
                    "label": int(plan.label[i]),
                    "gh": int(plan.grid_h[i]),
                    "gw": int(plan.grid_w[i]),
                    "nk": int(plan.n_kept[i]),
                }
                if plan.crop is not None:  # augmenting; absent otherwise, so such tasks are unchanged
                    member["crop"] = list(plan.crop_box(i))
                    member["flip"] = plan.flipped(i)
                members.append(member)
            rows.append(members)
        task = {
            "shard": first_shard + k,
            "epoch": int(plan.epoch),
            "seed": int(seed),
            "seq_len": int(plan.seq_len),
            "patch_size": int(plan.patch_size),
            "rows": rows,
        }
        tasks.append(json.dumps(task, sort_keys=True, separators=(",", ":")))
    return tasks


def task_digest(task_json: str) -> str:
    """Identity of a task (and so of its shard's content, given the config and the image files)."""
    return hashlib.sha256(task_json.encode()).hexdigest()


def build_shard(task_json: str, cfg: PackConfig) -> tuple[pa.Table, ShardResult]:
    """Decode, lay out and pad one shard's sequences. Returns (shard table, result metadata)."""
    task = json.loads(task_json)
    seq_len, p = int(task["seq_len"]), int(task["patch_size"])
    seed, epoch = int(task["seed"]), int(task["epoch"])
    rows = task["rows"]
    n_rows = len(rows)
    tok = schema.token_bytes(p)
    patches = np.zeros((n_rows, seq_len, tok), np.uint8)  # (R, L, p*p*3); padding stays zero
    segment_ids = np.zeros((n_rows, seq_len), np.int16)
    pos_h = np.zeros((n_rows, seq_len), np.int16)
    pos_w = np.zeros((n_rows, seq_len), np.int16)
    seg_cols: dict[str, list[np.ndarray]] = {name: [] for name in schema.SEGMENT_COLUMNS}
    result = ShardResult(shard=int(task["shard"]), epoch=epoch, rows=n_rows, images=0, real_tokens=0)
    # Parquet rows: each row group read once for the whole shard (containers.read_many).
    prefetched = containers.read_many(m["path"] for row in rows for m in row)
    for r, members in enumerate(rows):
        cursor = 0
        ids, labels, ghs, gws, fulls = [], [], [], [], []
        for m in members:
            gh, gw, nk = int(m["gh"]), int(m["gw"]), int(m["nk"])
            if cursor + nk > seq_len:  # a plan that violates its own contract: fail loudly
                raise RuntimeError(f"shard {task['shard']} row {r}: {cursor + nk} tokens > seq_len {seq_len}")
            try:
                source = prefetched.get(m["path"], m["path"])
                if isinstance(source, containers.MemberError):
                    raise DecodeError(source.reason)
                if isinstance(source, bytes) and not source:
                    raise DecodeError("zero-byte file")
                t = decode_tokens(
                    source,
                    grid_h=gh,
                    grid_w=gw,
                    patch_size=p,
                    n_kept=nk,
                    seed=seed,
                    epoch=epoch,
                    key=m["key"],
                    cfg=cfg.decode,
                    crop=tuple(m["crop"]) if "crop" in m else None,
                    hflip=bool(m.get("flip", False)),
                    out=patches[r, cursor : cursor + nk],  # decoded straight into the row
                )
            except DecodeError as e:
                result.rejections.append([int(m["id"]), e.reason])
                continue
            seg = len(ids) + 1
            segment_ids[r, cursor : cursor + nk] = seg
            pos_h[r, cursor : cursor + nk] = t.pos_h
            pos_w[r, cursor : cursor + nk] = t.pos_w
            cursor += nk
            ids.append(int(m["id"]))
            labels.append(int(m["label"]))
            ghs.append(gh)
            gws.append(gw)
            fulls.append(gh * gw)
            result.placements.append([int(m["id"]), r, seg])
        result.images += len(ids)
        result.real_tokens += cursor
        seg_cols["image_ids"].append(np.asarray(ids, np.int64))
        seg_cols["labels"].append(np.asarray(labels, np.int64))
        seg_cols["grid_h"].append(np.asarray(ghs, np.int32))
        seg_cols["grid_w"].append(np.asarray(gws, np.int32))
        seg_cols["tokens_full"].append(np.asarray(fulls, np.int32))
    packed = schema.PackedRows(patches=patches, segment_ids=segment_ids, pos_h=pos_h, pos_w=pos_w, **seg_cols)
    return schema.rows_to_table(packed, seq_len, p), result


def build_shard_bytes(task_json: str, cfg: PackConfig) -> tuple[pa.Buffer, ShardResult]:
    """:func:`build_shard`, serialised exactly as `navit pack` writes it (a pa.Buffer: the same bytes
    as ``schema.table_to_parquet_bytes``, without its final copy)."""
    table, result = build_shard(task_json, cfg)
    return schema.table_to_parquet_buffer(table), result
