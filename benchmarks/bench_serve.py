"""Benchmark `navit serve` over loopback against reading the same shards locally. Run by hand:

    .venv/bin/python benchmarks/bench_serve.py [--data DIR] [--rows 1280] [--seq-len 1024] \
        [--patch-size 16] [--repeats 3]

Without ``--data`` it writes a synthetic pack (random pixels, the real shard format) to a temp
directory. It measures, each ``--repeats`` times (best and median reported):

- local:   pyarrow, memory-mapped, every row group of the epoch read into memory (one process);
- flight1: one client process streaming the whole epoch from `navit serve` (a separate process);
- flight2: two client processes at once, world_size 2 (each streams its half); aggregate rate.

MB/s counts the Arrow bytes of the record batches received (pixels dominate). The page cache is
warmed first, so "local" is memory speed, not disk speed.

``--stalled N [--max-streams M]`` measures something else: N clients open a stream and never read
it; it reports the server's RSS and threads before and 3 s after, how many streams the server
accepted and refused, and how long SIGTERM takes to stop it while they hold their streams.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from packer import schema  # noqa: E402

_CLIENT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from trainer.flight_client import FlightDataClient
uri, rank, world = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with FlightDataClient(uri) as c:
    c.info()  # connect before the clock starts
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # go
    t0 = time.perf_counter(); rows = nbytes = 0
    for b in c.batches(0, rank, world):
        rows += b.num_rows; nbytes += b.nbytes
    print(json.dumps({"rows": rows, "bytes": nbytes, "t0": t0, "t1": time.perf_counter()}))
"""


def write_pack(out: Path, rows: int, seq_len: int, patch: int, shard_rows: int) -> None:
    rng = np.random.default_rng(0)
    tb = schema.token_bytes(patch)
    entries = []
    for k, first in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - first)
        seg = np.ones((n, seq_len), np.int16)
        packed = schema.PackedRows(
            patches=rng.integers(0, 256, (n, seq_len, tb), dtype=np.uint8),
            segment_ids=seg,
            pos_h=np.zeros((n, seq_len), np.int16),
            pos_w=np.zeros((n, seq_len), np.int16),
            image_ids=[np.array([first + r]) for r in range(n)],
            labels=[np.array([r % 10]) for r in range(n)],
            grid_h=[np.array([32])] * n,
            grid_w=[np.array([32])] * n,
            tokens_full=[np.array([seq_len])] * n,
        )
        data = schema.table_to_parquet_bytes(schema.rows_to_table(packed, seq_len, patch))
        name = schema.shard_file_name(k)
        schema.atomic_write_bytes(*schema.resolve_fs(str(out / name)), data)
        entries.append(
            {"file": name, "rows": n, "images": n, "real_tokens": n * seq_len}
            | {"sha256": schema.sha256_bytes(data), "epoch": 0}
        )
    index = {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "seq_len": seq_len,
        "patch_size": patch,
        "channels": 3,
        "shards": entries,
        "totals": {},
        "config": {"note": "synthetic benchmark pack"},
    }
    (out / schema.INDEX_FILE).write_bytes(schema.dumps_index(index))


def read_local(data: str) -> tuple[int, int, float]:
    index = schema.read_index(data)
    t0 = time.perf_counter()
    rows = nbytes = 0
    for entry in index["shards"]:
        if entry.get("epoch", 0) != 0:
            continue
        pf = schema.open_shard(data, entry["file"], memory_map=True)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            rows += t.num_rows
            nbytes += t.nbytes
    return rows, nbytes, time.perf_counter() - t0


def read_flight(uri: str, world: int) -> tuple[int, int, float]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLIENT, str(ROOT), uri, str(r), str(world)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate()[0]) for p in procs]
    # Aggregate: all bytes over the span from the first start to the last finish.
    span = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return sum(r["rows"] for r in results), sum(r["bytes"] for r in results), span


def stalled(data: str, n: int, max_streams: int | None) -> None:
    import psutil
    import pyarrow.flight as fl

    extra = [] if max_streams is None else ["--max-streams", str(max_streams)]
    server = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", data, "--port", "0", "-q", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(re.search(r"127\.0\.0\.1:(\d+)", server.stdout.readline()).group(1))
    proc = psutil.Process(server.pid)
    base, threads0 = proc.memory_info().rss, proc.num_threads()
    ticket = fl.Ticket(json.dumps({"epoch": 0, "rank": 0, "world_size": 1}).encode())
    held, refused = [], 0
    for _ in range(n):
        client = fl.FlightClient(f"grpc+tcp://127.0.0.1:{port}")
        try:
            held.append((client, client.do_get(ticket)))  # the schema only; never read further
        except fl.FlightError:
            refused += 1
    time.sleep(3)
    rss, threads = proc.memory_info().rss, proc.num_threads()
    t = time.perf_counter()
    server.send_signal(signal.SIGTERM)
    try:
        server.communicate(timeout=60)
        stop = f"SIGTERM stopped it in {time.perf_counter() - t:.2f} s, exit code {server.returncode}"
    except subprocess.TimeoutExpired:
        server.kill()
        server.communicate()
        stop = "SIGTERM did not stop it within 60 s (killed)"
    print(
        f"{n} stalled clients, --max-streams {max_streams if max_streams is not None else 'default'}: "
        f"{len(held)} accepted, {refused} refused; server RSS {base / 2**20:.0f} -> {rss / 2**20:.0f} MiB "
        f"(+{(rss - base) / 2**20:.0f}), threads {threads0} -> {threads}; {stop}; "
        f"load avg {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="an existing pack directory (default: write a synthetic one)")
    ap.add_argument("--rows", type=int, default=1280)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stalled", type=int, help="measure N clients that never read instead")
    ap.add_argument("--max-streams", type=int, help="--stalled: the server's --max-streams")
    args = ap.parse_args()

    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="navit-bench-serve-")
        data = tmp.name
        t = time.perf_counter()
        write_pack(Path(data), args.rows, args.seq_len, args.patch_size, args.shard_rows)
        print(f"wrote synthetic pack {data} in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    if args.stalled:
        try:
            stalled(data, args.stalled, args.max_streams)
        finally:
            if tmp is not None:
                tmp.cleanup()
        return
    read_local(data)  # warm the page cache
    server = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", data, "--port", "0", "-q"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline()
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    uri = f"flight://127.0.0.1:{port}"
    try:
        results: dict[str, list[tuple[int, int, float]]] = {"local": [], "flight1": [], "flight2": []}
        for _ in range(args.repeats):
            results["local"].append(read_local(data))
            results["flight1"].append(read_flight(uri, 1))
            results["flight2"].append(read_flight(uri, 2))
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
        if tmp is not None:
            tmp.cleanup()

    rows, nbytes, _ = results["local"][0]
    print(
        f"pack: {rows} rows x {nbytes / rows / 1e6:.2f} MB = {nbytes / 1e9:.2f} GB; "
        f"cpus {os.cpu_count()}; load avg {os.getloadavg()[0]:.2f}"
    )
    print(f"{'mode':<9} {'best MB/s':>10} {'median MB/s':>12} {'best rows/s':>12}  vs local (best)")
    best_local = max(b / t for _, b, t in results["local"])
    for mode, runs in results.items():
        for r, b, _ in runs:
            # Same rows; Arrow byte counts differ only by a few offset buffers (table vs batches).
            assert r == rows and abs(b - nbytes) < nbytes / 1000, f"{mode}: {r} rows / {b} bytes"
        rates = [b / t for _, b, t in runs]
        best = max(rates)
        print(
            f"{mode:<9} {best / 1e6:>10.0f} {statistics.median(rates) / 1e6:>12.0f} "
            f"{max(r / t for r, _, t in runs):>12.0f}  {100 * best / best_local:5.0f}%"
        )


if __name__ == "__main__":
    main()
