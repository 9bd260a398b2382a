"""The pack's closing files, assembled on the driver from the plans and the shards' metadata.

``images.parquet`` (one row per input image per epoch: where it was packed, or why it was rejected),
``rejected.jsonl`` and ``index.json`` (config, per-epoch totals, shard list with sha256; written last, so
its presence means the pack is complete). Formats: :mod:`packer.schema`. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from packer import schema
from packer.build.execute import resolved_shard_rows
from packer.config import PackConfig
from packer.plan.sources import UNREADABLE_FOLDER, printable
from packer.plan.types import Plan

IMAGES_ROW_GROUP = 65536


def navit_version() -> str:
    try:
        from importlib.metadata import version

        return version("navit")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


@dataclass
class EpochRecord:
    epoch: int
    plan: Plan
    metas: list[dict[str, Any]] = field(default_factory=list)


def _augment_record(plan: Plan, i: int) -> dict[str, Any]:
    """images.parquet's augmentation columns of plan position i (whole image, unflipped when off)."""
    x0, y0, x1, y1 = plan.crop_box(i)
    return {"crop_x0": x0, "crop_y0": y0, "crop_x1": x1, "crop_y1": y1, "hflip": plan.flipped(i)}


def _images_and_rejections(epochs: list[EpochRecord]) -> tuple[pa.Table, list[str], dict[str, int]]:
    """images.parquet (one row per input image per epoch, sorted by epoch then image_id),
    rejected.jsonl lines, and rejection counts by reason."""
    cols: dict[str, list[Any]] = {f.name: [] for f in schema.IMAGES_SCHEMA}
    lines: list[str] = []
    by_reason: dict[str, int] = {}
    for rec in epochs:
        plan = rec.plan
        place: dict[int, tuple[int, int, int]] = {}
        failed: dict[int, str] = {}
        for m in rec.metas:
            for image_id, row, seg in m["placements"]:
                place[int(image_id)] = (int(m["shard"]), int(row), int(seg))
            for image_id, reason in m["rejections"]:
                failed[int(image_id)] = reason
        rows: list[tuple[int, dict[str, Any]]] = []
        for i in range(len(plan.image_id)):
            iid = int(plan.image_id[i])
            shard, row, seg = place.get(iid, (-1, -1, -1))
            reason = failed.get(iid)
            if reason is None and shard < 0:
                reason = "internal: planned but not placed"  # never expected; never silently lost
            rows.append(
                (
                    iid,
                    {
                        "epoch": rec.epoch,
                        "image_id": iid,
                        "path": plan.path[i],
                        "label": int(plan.label[i]),
                        "orig_h": int(plan.orig_h[i]),
                        "orig_w": int(plan.orig_w[i]),
                        "grid_h": int(plan.grid_h[i]),
                        "grid_w": int(plan.grid_w[i]),
                        "n_tokens_full": int(plan.n_full[i]),
                        "n_tokens": int(plan.n_kept[i]),
                        "shard": shard,
                        "row": row,
                        "segment": seg,
                        "rejected_reason": reason,
                        **_augment_record(plan, i),
                    },
                )
            )
        for rej in plan.rejected:
            rows.append(
                (
                    int(rej.image_id),
                    {
                        "epoch": rec.epoch,
                        "image_id": int(rej.image_id),
                        "path": rej.path,
                        "label": int(rej.label),
                        "orig_h": int(rej.orig_h),
                        "orig_w": int(rej.orig_w),
                        "grid_h": -1,
                        "grid_w": -1,
                        "n_tokens_full": -1,
                        "n_tokens": -1,
                        "shard": -1,
                        "row": -1,
                        "segment": -1,
                        "rejected_reason": rej.reason,
                        **dict.fromkeys(("crop_x0", "crop_y0", "crop_x1", "crop_y1"), -1),
                        "hflip": False,
                    },
                )
            )
        rows.sort(key=lambda r: r[0])
        for _, r in rows:
            # Valid UTF-8 in the output files: a name that is not shows its bytes as \xNN.
            r["path"] = printable(r["path"])
            if r["rejected_reason"] is not None:
                r["rejected_reason"] = printable(r["rejected_reason"])
            for k, v in r.items():
                cols[k].append(v)
            if r["rejected_reason"] is not None:
                lines.append(
                    json.dumps({"path": r["path"], "reason": r["rejected_reason"], "epoch": rec.epoch}) + "\n"
                )
                by_reason[r["rejected_reason"]] = by_reason.get(r["rejected_reason"], 0) + 1
    table = pa.Table.from_pydict(cols, schema=schema.IMAGES_SCHEMA)
    return table, lines, by_reason


def _epoch_totals(rec: EpochRecord, seq_len: int) -> dict[str, Any]:
    plan = rec.plan
    packed = sum(int(m["images"]) for m in rec.metas)
    pack_rejected = sum(len(m["rejections"]) for m in rec.metas)
    plan_rejected = len(plan.rejected)
    sequences = sum(int(m["rows"]) for m in rec.metas)
    real = sum(int(m["real_tokens"]) for m in rec.metas)
    padding = sequences * seq_len - real
    lb = math.ceil(real / seq_len) if real else 0
    return {
        "epoch": rec.epoch,
        "images_in": len(plan.image_id) + plan_rejected,
        "images_packed": packed,
        "images_rejected": plan_rejected + pack_rejected,
        "images_rejected_at_plan": plan_rejected,
        "images_rejected_at_pack": pack_rejected,
        # Folders that could not be listed (each one rejected input; the images in them are unknown).
        "folders_unreadable": sum(r.reason.startswith(UNREADABLE_FOLDER + ":") for r in plan.rejected),
        "sequences": sequences,
        "real_tokens": real,
        "padding_tokens": padding,
        "padding_fraction": padding / (sequences * seq_len) if sequences else 0.0,
        "lower_bound_sequences": lb,
        "shards": len(rec.metas),
    }


def build_index(cfg: PackConfig, source: str, epochs: list[EpochRecord]) -> dict[str, Any]:
    """index.json content. Deterministic: no timings, hosts or worker counts in it."""
    seq_len = cfg.packing.seq_len
    per_epoch = [_epoch_totals(rec, seq_len) for rec in epochs]
    totals: dict[str, Any] = {}
    for key in (
        "images_in",
        "images_packed",
        "images_rejected",
        "images_rejected_at_plan",
        "images_rejected_at_pack",
        "folders_unreadable",
        "sequences",
        "real_tokens",
        "padding_tokens",
        "lower_bound_sequences",
        "shards",
    ):
        totals[key] = sum(int(t[key]) for t in per_epoch)
    cap = totals["sequences"] * seq_len
    totals["padding_fraction"] = totals["padding_tokens"] / cap if cap else 0.0
    lb = totals["lower_bound_sequences"]
    totals["excess_over_lower_bound"] = (totals["sequences"] - lb) / lb if lb else 0.0
    shards = [
        {
            "file": m["file"],
            "epoch": int(m["epoch"]),
            "rows": int(m["rows"]),
            "images": int(m["images"]),
            "real_tokens": int(m["real_tokens"]),
            "sha256": m["sha256"],
        }
        for rec in epochs
        for m in rec.metas
    ]
    classes = epochs[0].plan.classes if epochs else []
    return {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "navit_version": navit_version(),
        "config": cfg.model_dump(mode="json"),
        "fingerprint": cfg.fingerprint(),
        "source": source,
        "seed": cfg.seed,
        "seq_len": seq_len,
        "patch_size": cfg.packing.patch_size,
        "channels": schema.CHANNELS,
        "max_images_per_seq": cfg.packing.max_images_per_seq,
        "shard_rows": resolved_shard_rows(cfg),
        "epochs": len(epochs),
        "classes": list(classes),
        "shards": shards,
        "totals": totals,
        "per_epoch": per_epoch,
    }
