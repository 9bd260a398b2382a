"""Benchmark `navit stats` on a synthetic, metadata-heavy pack (run by hand; numbers go in docs/stats.md).

The pack has the metadata of a real one — seq_len 256, 682 sequences per shard (what the default
shard size gives for seq_len 256 and patch 16), row groups of 16, 1–5 images per sequence with
random lengths, an images.parquet row per image — but 1-pixel patches, so a million sequences fit
on disk (0.75 GB of pixel bytes instead of 200 GB). `navit stats` never reads the pixel bytes, so
what it reads is what it would read on the real pack.

    .venv/bin/python benchmarks/bench_stats.py --rows 1000000 --out /tmp/navit-bench-stats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from packer import schema  # noqa: E402


def make_shard(rng: np.random.Generator, n: int, seq_len: int, first_id: int) -> tuple[pa.Table, dict]:
    """n random rows: 1–5 images each, a random fill of 75–100% of seq_len."""
    k = rng.integers(1, 6, n)  # images per row
    fill = rng.integers(seq_len * 3 // 4, seq_len + 1, n)
    seg = np.zeros((n, seq_len), np.int16)
    lengths = []
    for r in range(n):
        cuts = np.sort(rng.choice(np.arange(1, fill[r]), k[r] - 1, replace=False))
        ln = np.diff(np.concatenate([[0], cuts, [fill[r]]]))
        seg[r, : fill[r]] = np.repeat(np.arange(1, k[r] + 1, dtype=np.int16), ln)
        lengths.append(ln)
    kept = np.concatenate(lengths)
    gw = np.maximum(1, np.round(np.sqrt(kept * 1.3)).astype(np.int64))  # a grid a bit bigger than kept
    gh = np.maximum(1, -(-np.ceil(kept * 1.3).astype(np.int64) // gw))
    full = gh * gw
    offsets = np.concatenate([[0], np.cumsum(k)])
    ids = np.arange(first_id, first_id + len(kept), dtype=np.int64)
    labels = rng.integers(0, 10, len(kept))

    def split(a: np.ndarray) -> list[np.ndarray]:
        return [a[offsets[r] : offsets[r + 1]] for r in range(n)]

    zeros = np.zeros((n, seq_len), np.int16)
    rows = schema.PackedRows(
        patches=np.zeros((n, seq_len, schema.token_bytes(1)), np.uint8),
        segment_ids=seg,
        pos_h=zeros,
        pos_w=zeros,
        image_ids=split(ids),
        labels=split(labels),
        grid_h=split(gh),
        grid_w=split(gw),
        tokens_full=split(full),
    )
    meta = {
        "ids": ids,
        "labels": labels,
        "gh": gh,
        "gw": gw,
        "full": full,
        "kept": kept,
        "row": np.repeat(np.arange(n), k),
        "segment": np.concatenate([np.arange(1, x + 1) for x in k]),
    }
    return schema.rows_to_table(rows, seq_len, 1), meta


def build(out: Path, total_rows: int, seq_len: int, shard_rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    entries, cols = [], {f.name: [] for f in schema.IMAGES_SCHEMA if f.name != "path"}
    next_id, real = 0, 0
    for k, start in enumerate(range(0, total_rows, shard_rows)):
        n = min(shard_rows, total_rows - start)
        table, m = make_shard(rng, n, seq_len, next_id)
        data = schema.table_to_parquet_bytes(table)
        name = schema.shard_file_name(k)
        schema.atomic_write_bytes(*schema.resolve_fs(str(out / name)), data)
        shard_real = int(m["kept"].sum())
        entries.append(
            {
                "file": name,
                "epoch": 0,
                "rows": n,
                "images": len(m["ids"]),
                "real_tokens": shard_real,
                "sha256": schema.sha256_bytes(data),
            }
        )
        nimg = len(m["ids"])
        for key, val in (
            ("epoch", np.zeros(nimg)),
            ("image_id", m["ids"]),
            ("label", m["labels"]),
            ("orig_h", m["gh"] * 7),
            ("orig_w", m["gw"] * 9),
            ("grid_h", m["gh"]),
            ("grid_w", m["gw"]),
            ("n_tokens_full", m["full"]),
            ("n_tokens", m["kept"]),
            ("shard", np.full(nimg, k)),
            ("row", m["row"]),
            ("segment", m["segment"]),
            ("crop_x0", np.zeros(nimg)),  # whole images, unflipped (no augmentation)
            ("crop_y0", np.zeros(nimg)),
            ("crop_x1", m["gw"] * 9),
            ("crop_y1", m["gh"] * 7),
            ("hflip", np.zeros(nimg, bool)),
        ):
            cols[key].append(val)
        next_id += nimg
        real += shard_real
    arrays = {}
    for f in schema.IMAGES_SCHEMA:
        if f.name == "path":
            arrays[f.name] = pa.array([f"img/{i:08d}.jpg" for i in range(next_id)], pa.string())
        elif f.name == "rejected_reason":
            arrays[f.name] = pa.nulls(next_id, pa.string())
        else:
            arrays[f.name] = pa.array(np.concatenate(cols[f.name]).astype(f.type.to_pandas_dtype()), f.type)
    pq.write_table(pa.table(arrays, schema=schema.IMAGES_SCHEMA), out / schema.IMAGES_FILE)
    (out / schema.REJECTED_FILE).write_text("")
    padding = total_rows * seq_len - real
    index = {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "seq_len": seq_len,
        "patch_size": 1,
        "channels": schema.CHANNELS,
        "max_images_per_seq": 5,
        "config": {},
        "seed": seed,
        "classes": [f"class{i}" for i in range(10)],
        "shards": entries,
        "totals": {
            "images_in": next_id,
            "images_packed": next_id,
            "images_rejected": 0,
            "sequences": total_rows,
            "real_tokens": real,
            "padding_tokens": padding,
            "padding_fraction": padding / (total_rows * seq_len),
            "lower_bound_sequences": -(-real // seq_len),
        },
    }
    (out / schema.INDEX_FILE).write_bytes(schema.dumps_index(index))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="packed sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--shard-rows", type=int, default=682)
    ap.add_argument("--out", type=Path, default=Path("/tmp/navit-bench-stats"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    out = args.out / f"rows{args.rows}"
    if not (out / schema.INDEX_FILE).exists():
        t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        build(out, args.rows, args.seq_len, args.shard_rows)
        print(f"generated {out} in {time.perf_counter() - t0:.1f}s")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"pack: {args.rows:,} sequences, {len(list((out / 'shards').iterdir()))} shards, {size / 1e6:.0f} MB"
    )
    navit = [str(Path(sys.executable).with_name("navit"))]
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        res = subprocess.run([*navit, "stats", str(out), "--json"], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if res.returncode != 0:
            sys.exit(f"navit stats failed ({res.returncode}): {res.stderr[-2000:]}")
    rep = json.loads(res.stdout)
    assert rep["sequences"] == args.rows and rep["consistency"]["ok"], rep["consistency"]
    best = min(times)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "images": rep["images_packed"],
                "seconds_best": round(best, 2),
                "seconds_all": [round(t, 2) for t in times],
                "sequences_per_s": round(args.rows / best),
                "cpus": os.cpu_count(),
                "machine": platform.platform(),
            }
        )
    )


if __name__ == "__main__":
    main()
