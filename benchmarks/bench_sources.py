"""Benchmark: the same JPEGs as an ImageFolder, as WebDataset tar shards and as Parquet files, on local
disk and through an S3 API server (moto's standalone server on loopback, as tests/test_s3.py uses) —
header scan and `navit pack` throughput (run by hand).

Makes N real-sized JPEGs (quality 90, longer side 500-1400 px, each a different scale/crop of the CC0
WebP photos in ../shared/data/gcompris-cc0, or synthetic images when that folder is absent) in a temp
dir (nothing committed), writes them in the three layouts (tar shards and Parquet files of --per-file
images, Parquet row groups of 100), uploads them to the S3 server, then measures per layout and place:

  scan  — ``packer.plan.planner.scan_source`` (listing + header scan): the local loop (one process)
          and Ray Data with 2 workers;
  pack  — ``packer.build.pipeline.pack`` (plan + decode + write), 2 workers, default config with
          seq_len 1024 (Ray already running: start-up not counted).

It checks that the three layouts give byte-identical shards. Prints a Markdown table and one JSON line.

    .venv/bin/python benchmarks/bench_sources.py [--n 2000] [--per-file 500] [--skip-s3] [--quick-s3]
        [--layouts folder,wds,parquet]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packer.config import PackConfig  # noqa: E402
from packer.synth_formats import ROW_GROUP_ROWS  # noqa: E402,F401

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gcompris-cc0"
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def make_jpegs(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(relative path, JPEG bytes) of N distinct real-sized JPEGs, sorted by path."""
    rng = np.random.default_rng(seed)
    photos = sorted(PHOTOS.rglob("*.webp")) if PHOTOS.is_dir() else []
    out = []
    for i in range(n):
        side = int(rng.integers(500, 1401))
        if photos:
            src = photos[i % len(photos)]
            label = src.parent.name
            with Image.open(src) as im:
                im = im.convert("RGB")
                w, h = im.size
                f = float(rng.uniform(0.8, 1.0))  # a different crop of each copy
                box = (0, 0, int(w * f), int(h * f))
                im = im.crop(box)
        else:
            label = f"class{i % 5}"
            im = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        scale = side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append((f"{label}/img_{i:06d}.jpg", buf.getvalue()))
    return sorted(out)


def write_layouts(root: Path, images: list[tuple[str, bytes]], per_file: int) -> dict[str, Path]:
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = sorted({rel.split("/")[0] for rel, _ in images})
    for rel, data in images:
        (root / "folder" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "folder" / rel).write_bytes(data)
    (root / "wds").mkdir()
    (root / "parquet").mkdir()
    for k in range(0, len(images), per_file):
        chunk = images[k : k + per_file]
        with tarfile.open(root / "wds" / f"shard-{k // per_file:06d}.tar", "w") as tf:
            for rel, data in chunk:
                cls = str(classes.index(rel.split("/")[0])).encode()
                for name, blob in ((rel, data), (rel.rsplit(".", 1)[0] + ".cls", cls)):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
        table = pa.table(
            {
                "image": pa.array([{"bytes": d, "path": r} for r, d in chunk]),
                "label": pa.array([classes.index(r.split("/")[0]) for r, _ in chunk], pa.int64()),
            }
        )
        pq.write_table(table, root / "parquet" / f"part-{k // per_file:06d}.parquet", row_group_size=100)
    return {name: root / name for name in ("folder", "wds", "parquet")}


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.2)
    return proc, endpoint


def upload(layouts: dict[str, Path], endpoint: str) -> dict[str, str]:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=ENV["AWS_ACCESS_KEY_ID"],
        secret_key=ENV["AWS_SECRET_ACCESS_KEY"],
        region=ENV["AWS_DEFAULT_REGION"],
        endpoint_override=endpoint.split("://", 1)[1],
        scheme="http",
        allow_bucket_creation=True,
    )
    fs.create_dir("bench")
    for name, root in layouts.items():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                with fs.open_output_stream(f"bench/{name}/{p.relative_to(root).as_posix()}") as f:
                    f.write(p.read_bytes())
    return {name: f"s3://bench/{name}" for name in layouts}


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.parquet"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--per-file", type=int, default=500)
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--quick-s3", action="store_true", help="no Ray header scan through S3 (slow servers)")
    ap.add_argument("--layouts", default="folder,wds,parquet", help="comma-separated subset to measure")
    args = ap.parse_args()

    from packer.build.pipeline import pack
    from packer.plan.planner import scan_source
    from packer.ray_runtime import ensure_ray

    tmp = Path(tempfile.mkdtemp(prefix="navit-bench-sources-"))
    proc = None
    try:
        t0 = time.perf_counter()
        images = make_jpegs(args.n)
        mb = sum(len(d) for _, d in images) / 1e6
        layouts = write_layouts(tmp, images, args.per_file)
        chosen = args.layouts.split(",")
        layouts = {k: v for k, v in layouts.items() if k in chosen or k == "folder"}  # folder: reference
        print(
            f"made {len(images)} JPEGs ({mb:.0f} MB, {mb / len(images) * 1000:.0f} kB each) in "
            f"{time.perf_counter() - t0:.0f}s",
            file=sys.stderr,
        )
        places = {"local": {k: str(v) for k, v in layouts.items()}}
        if not args.skip_s3:
            proc, endpoint = start_moto()
            os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)  # before Ray starts: workers inherit it
            places["s3"] = upload(layouts, endpoint)
            print(f"uploaded to {endpoint}", file=sys.stderr, flush=True)
        ensure_ray(None, 2)
        cfg = PackConfig.model_validate({"packing": {"seq_len": 1024}})
        scan_source(places["local"]["folder"], cfg, use_ray=True, workers=2)  # warm Ray Data up
        rows, results = [], []
        reference = None
        for place, sources in places.items():
            for name, source in sources.items():
                if name not in chosen:
                    continue
                rec = {"place": place, "layout": name, "images": len(images)}
                t = time.perf_counter()
                scan = scan_source(source, cfg, use_ray=False)
                rec["scan_local_s"] = time.perf_counter() - t
                assert not any(scan.headers.reason), "every image must scan"
                if place == "local" or not args.quick_s3:
                    t = time.perf_counter()
                    scan_source(source, cfg, use_ray=True, workers=2)
                    rec["scan_ray2_s"] = time.perf_counter() - t
                out = tmp / f"out-{place}-{name}"
                t = time.perf_counter()
                pack(source, str(out), cfg, workers=2)
                rec["pack_s"] = time.perf_counter() - t
                got = shards(out)
                if reference is None:  # the folder's shards, packed once here if not measured
                    ref_out = tmp / "out-reference"
                    pack(places["local"]["folder"], str(ref_out), cfg, workers=2)
                    reference = shards(ref_out)
                    shutil.rmtree(ref_out)
                rec["identical_shards"] = got == reference
                shutil.rmtree(out)
                results.append(rec)
                ray_rate = f"{len(images) / rec['scan_ray2_s']:.0f}" if "scan_ray2_s" in rec else "–"
                rows.append(
                    f"| {place} | {name} | {len(images) / rec['scan_local_s']:.0f} | {ray_rate} | "
                    f"{len(images) / rec['pack_s']:.1f} | {'yes' if rec['identical_shards'] else 'NO'} |"
                )
                print(rows[-1], f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        load = os.getloadavg()
        print(
            f"\n{args.n} JPEGs, {mb:.0f} MB; {platform.machine()}, {os.cpu_count()} cores, "
            f"load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end\n"
        )
        print(
            "| where | layout | header scan img/s (1 process) | header scan img/s (Ray, 2 workers) "
            "| pack img/s (2 workers) | shards identical to folder |"
        )
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
        print(json.dumps({"n": args.n, "mb": mb, "results": results}))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
