"""Loader throughput from shards against what the trainer consumes (run by hand; not a test).

Measures, on this machine:
1. the shard loader alone (pyarrow memory-mapped row groups → shuffle buffer → collated uint8
   batches), in-process (one core): rows/s and MB/s of patch bytes;
2. the trainer on CPU (tiny preset, full `navit train` loop): rows/s consumed, images/s, tokens/s and
   the data-wait fraction (time waiting for a batch / wall time), with 0 and 1 DataLoader workers.

    .venv/bin/python benchmarks/bench_loader.py                    # synthetic pack in a temp dir
    .venv/bin/python benchmarks/bench_loader.py --data PACK_DIR    # a pack from `navit pack`

Without --data it writes a synthetic pack (random pixels, 4-16 images per row, realistic layout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packer import schema  # noqa: E402


def synthetic_pack(out: Path, rows: int, seq_len: int, patch: int, seed: int = 0) -> Path:
    """A pack of ``rows`` rows: each row 4-16 images of random grids, random pixels, tail padding."""
    rng = np.random.default_rng(seed)
    d = patch * patch * 3
    shard_rows = 64
    entries = []
    for s0 in range(0, rows, shard_rows):
        n = min(shard_rows, rows - s0)
        patches = rng.integers(0, 256, size=(n, seq_len, d), dtype=np.uint8)
        seg = np.zeros((n, seq_len), np.int16)
        ph, pw = np.zeros_like(seg), np.zeros_like(seg)
        ids, labels, gh_l, gw_l, full = [], [], [], [], []
        for r in range(n):
            k = int(rng.integers(4, 17))
            sizes = rng.multinomial(int(seq_len * 0.95) - k, np.ones(k) / k) + 1
            at, ghs, gws = 0, [], []
            for j, t in enumerate(sizes, start=1):
                gw = max(1, int(np.sqrt(t)))
                gh = max(1, t // gw)
                t = gh * gw
                seg[r, at : at + t] = j
                ph[r, at : at + t] = np.repeat(np.arange(gh), gw)
                pw[r, at : at + t] = np.tile(np.arange(gw), gh)
                at += t
                ghs.append(gh)
                gws.append(gw)
            patches[r, at:] = 0
            ids.append(np.arange(k, dtype=np.int64))
            labels.append(rng.integers(0, 10, size=k))
            gh_l.append(np.array(ghs, np.int32))
            gw_l.append(np.array(gws, np.int32))
            full.append(np.array(ghs, np.int32) * np.array(gws, np.int32))
        table = schema.rows_to_table(
            schema.PackedRows(patches, seg, ph, pw, ids, labels, gh_l, gw_l, full), seq_len, patch
        )
        data = schema.table_to_parquet_bytes(table)
        name = schema.shard_file_name(len(entries))
        schema.atomic_write_bytes(*schema.resolve_fs(str(out / name)), data)
        entries.append(
            {"file": name, "rows": n, "images": 0, "real_tokens": 0, "sha256": schema.sha256_bytes(data)}
        )
    index = {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "seq_len": seq_len,
        "patch_size": patch,
        "channels": 3,
        "config": {"synthetic": True},
        "shards": entries,
        "totals": {k: 0 for k in schema.TOTALS_KEYS},
    }
    schema.atomic_write_bytes(*schema.resolve_fs(str(out / schema.INDEX_FILE)), schema.dumps_index(index))
    return out


def bench_loader(data: str, batch_size: int, batches: int) -> dict:
    from trainer.shards import ShardSource, open_shard_set

    shards = open_shard_set(data, verify=False)
    src = ShardSource(shards, batch_size, seed=0, shuffle_buffer=256)
    it = src.batches()
    next(it)  # warm-up: footers, first row groups
    t0 = time.perf_counter()
    n_rows = n_bytes = 0
    for _ in range(batches):
        b = next(it)
        n_rows += b.tensors["patches"].shape[0]
        n_bytes += b.tensors["patches"].numel()
    dt = time.perf_counter() - t0
    return {"rows_per_s": n_rows / dt, "mb_per_s": n_bytes / dt / 1e6, "rows": n_rows, "seconds": dt}


def bench_trainer(data: str, batch_size: int, steps: int, workers: int, run: Path) -> dict:
    from trainer.config import load_train_config
    from trainer.data import open_source
    from trainer.loop import train

    cfg = load_train_config(
        None,
        {
            "model.preset": "tiny",
            "schedule.steps": steps,
            "schedule.warmup_steps": 1,
            "data.batch_size": batch_size,
            "data.workers": workers,
            "checkpoint.every": 0,
            "device": "cpu",
            "log_every": 2,
        },
    )

    def make(info):
        return open_source(data, batch_size=batch_size, seed=0, workers=workers, verify=False)

    res = train(cfg, make, run, verbose=False)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # Skip the first window (worker start-up, first row groups, allocator warm-up).
    wins = [r for r in recs if "loss" in r][1:]
    wall = sum(r["window_s"] for r in wins)
    n_steps = sum(r["window_steps"] for r in wins)
    return {
        "workers": workers,
        "rows_per_s": n_steps * batch_size / wall,
        "images_per_s": sum(r["images_per_s"] * r["window_s"] for r in wins) / wall,
        "tokens_per_s": sum(r["tokens_per_s"] * r["window_s"] for r in wins) / wall,
        "data_wait_fraction": sum(r["data_wait_fraction"] * r["window_s"] for r in wins) / wall,
        "step_s": wall / n_steps,
        "steps_measured": n_steps,
        "wall_s": res.wall_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="pack directory (default: a synthetic pack in a temp dir)")
    ap.add_argument("--rows", type=int, default=512, help="synthetic pack rows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the trainer (0 = default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(synthetic_pack(Path(tmp) / "pack", args.rows, args.seq_len, args.patch_size))
        loader = bench_loader(data, args.batch_size, args.loader_batches)
        trainer = [bench_trainer(data, args.batch_size, args.steps, w, Path(tmp) / f"run{w}") for w in (0, 1)]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        "data": args.data or f"synthetic {args.rows} rows, seq_len {args.seq_len}, patch {args.patch_size}",
        "loader_one_core": loader,
        "trainer_tiny_cpu": trainer,
    }
    print(json.dumps(report, indent=2))
    print(
        f"\nloader (1 core): {loader['rows_per_s']:.0f} rows/s, {loader['mb_per_s']:.0f} MB/s | "
        + " | ".join(
            f"trainer workers={t['workers']}: {t['rows_per_s']:.1f} rows/s, "
            f"data-wait {t['data_wait_fraction']:.2%}"
            for t in trainer
        )
    )


if __name__ == "__main__":
    main()
