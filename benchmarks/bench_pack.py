"""Benchmark of the `navit pack` execution stage on real >1 MP JPEG photos (run by hand).

Makes 1-3 MP JPEGs (quality 90) by upscaling the CC0 WebP photos in ../shared/data/gcompris-cc0 into a
temp dir (nothing committed), then measures, at target longer side 256 and 512 (patch 16):

  (i)   full-decode floor: a bare loop of ``Image.open(f).convert("RGB")``;
  (ii)  a bare loop of navit's per-image work without Ray: read, draft, decode, resize, patchify
        (``packer.build.decode.load_resized`` + ``patchify``), one core; and the same loop plus navit's
        layout, Parquet serialisation, sha256 and atomic write, still without Ray (to split the
        overhead of (iii) into writing and Ray);
  (iii) the pack pipeline (Ray Data, one task per shard, Parquet serialisation, atomic writes) with
        1 and 2 workers, on a precomputed plan (planning is a separate, header-only stage; its time is
        reported by the planner's own benchmark).

Reports images/s, MB/s of JPEG input, per-core rates, and peak RSS (driver + Ray's processes and
workers, sampled every 50 ms), also as growth over the first sample (idle Ray + driver).

    .venv/bin/python benchmarks/bench_pack.py [--n 218] [--sides 256,512] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packer.build import decode  # noqa: E402
from packer.config import PackConfig  # noqa: E402
from packer.plan.types import Plan  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gcompris-cc0"
P = 16
SEQ_LEN = 1024


def make_jpegs(out: Path, n: int, copies: int = 1, seed: int = 0) -> list[Path]:
    """Upscale the CC0 WebPs to an area uniform in [1, 3] MP and save as JPEG q90 (``copies`` times
    each, at different random sizes, so runs are long enough to amortise fixed start-up costs)."""
    srcs = sorted(PHOTOS.rglob("*.webp"))[:n]
    if not srcs:
        sys.exit(f"no WebP photos under {PHOTOS}")
    rng = np.random.default_rng(seed)
    files = []
    for k, s in enumerate(srcs * copies):
        img = Image.open(s).convert("RGB")
        area = rng.uniform(1.0e6, 3.0e6)
        scale = (area / (img.width * img.height)) ** 0.5
        big = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        f = out / s.parent.name / f"{k:04d}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        big.save(f, "JPEG", quality=90)
        files.append(f)
    return files


def grid_for(w: int, h: int, side: int) -> tuple[int, int]:
    s = side / max(w, h)
    return max(1, round(h * s / P)), max(1, round(w * s / P))


def simple_plan(files: list[Path], root: Path, side: int, epoch: int = 0) -> Plan:
    """Longer side = ``side``, no dropping, next-fit into SEQ_LEN: enough to drive the executor."""
    rows = []
    for i, f in enumerate(files):
        with Image.open(f) as im:
            w, h = im.size
        gh, gw = grid_for(w, h, side)
        rows.append((i, str(f), f.relative_to(root).as_posix(), h, w, gh, gw))
    seqs, cur, used = [], [], 0
    for k, r in enumerate(rows):
        n = r[5] * r[6]
        if cur and (used + n > SEQ_LEN or len(cur) >= 64):
            seqs.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += n
    seqs.append(cur)
    off = np.zeros(len(seqs) + 1, np.int64)
    off[1:] = np.cumsum([len(s) for s in seqs])
    nfull = np.array([r[5] * r[6] for r in rows], np.int32)
    return Plan(
        epoch=epoch,
        seq_len=SEQ_LEN,
        patch_size=P,
        image_id=np.arange(len(rows), dtype=np.int64),
        path=[r[1] for r in rows],
        key=[r[2] for r in rows],
        label=np.zeros(len(rows), np.int64),
        orig_h=np.array([r[3] for r in rows], np.int32),
        orig_w=np.array([r[4] for r in rows], np.int32),
        grid_h=np.array([r[5] for r in rows], np.int32),
        grid_w=np.array([r[6] for r in rows], np.int32),
        n_full=nfull,
        n_kept=nfull.copy(),
        seq_offsets=off,
        seq_members=np.array([m for s in seqs for m in s], np.int64),
    )


class PeakRSS:
    """Samples the RSS of this process and all its descendants (Ray's raylet and workers) every 50 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self.first = 0  # the first sample: Ray's idle processes + the driver before the run
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.first = self.first or total
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=218, help="source photos to use")
    ap.add_argument("--copies", type=int, default=2, help="JPEGs made per source photo")
    ap.add_argument("--sides", default="256,512")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the best of each is kept")
    ap.add_argument("--shard-rows", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from packer.build.pipeline import pack
    from packer.ray_runtime import ensure_ray

    tmp = Path(tempfile.mkdtemp(prefix="navit-bench-pack-"))
    try:
        t0 = time.perf_counter()
        files = make_jpegs(tmp / "jpeg", args.n, args.copies)
        n = len(files)
        mb = sum(f.stat().st_size for f in files) / 1e6
        mp = np.mean([np.prod(Image.open(f).size) for f in files]) / 1e6
        print(f"{n} JPEGs, {mb:.1f} MB, mean {mp:.2f} MP (made in {time.perf_counter() - t0:.1f}s)")
        machine = f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        sides = [int(x) for x in args.sides.split(",")]
        ensure_ray(num_cpus=os.cpu_count())
        cfg0 = PackConfig()
        # Warm-up: start Ray's workers and import navit in them (not timed).
        warm = simple_plan(files[:8], tmp / "jpeg", 64)
        warm_cfg = PackConfig.model_validate({"packing": {"seq_len": SEQ_LEN}, "output": {"shard_rows": 1}})
        for w in (1, 2):
            pack(str(tmp / "jpeg"), str(tmp / f"warm{w}"), warm_cfg, workers=w, planner=lambda *a: warm)
        plans = {side: simple_plan(files, tmp / "jpeg", side) for side in sides}
        cfg = PackConfig.model_validate(
            {"packing": {"seq_len": SEQ_LEN, "patch_size": P}, "output": {"shard_rows": args.shard_rows}}
        )

        def full_decode() -> None:
            for f in files:
                Image.open(f).convert("RGB")

        def loop(plan: Plan) -> None:
            for f, gh, gw in zip(files, plan.grid_h, plan.grid_w, strict=True):
                decode.patchify(decode.load_resized(str(f), int(gh), int(gw), P, cfg0.decode), P)

        from packer import schema
        from packer.build.layout import build_shard_bytes, shard_tasks

        def loop_write(plan: Plan, out: Path) -> None:
            """(ii) plus navit's layout, Parquet serialisation, sha256 and atomic write — no Ray."""
            fs, base = schema.resolve_fs(str(out))
            for task in shard_tasks(plan, cfg.seed, args.shard_rows):
                data, res = build_shard_bytes(task, cfg)
                schema.sha256_bytes(data)
                schema.atomic_write_bytes(fs, schema.join(base, schema.shard_file_name(res.shard)), data)
            shutil.rmtree(out)

        best: dict[str, float] = {}
        peak: dict[str, int] = {}
        growth: dict[str, int] = {}
        shards: dict[int, tuple[int, float]] = {}

        def keep(name: str, dt: float) -> None:
            best[name] = min(best.get(name, float("inf")), dt)

        # Interleaved repeats: on a shared machine, load changes over time; every variant sees it.
        for rep in range(args.repeat):
            keep("full", timed(full_decode))
            for side in sides:
                plan = plans[side]
                keep(f"loop{side}", timed(lambda plan=plan: loop(plan)))
                keep(f"write{side}", timed(lambda plan=plan, side=side: loop_write(plan, tmp / f"lw{side}")))
                for w in (1, 2):
                    out = tmp / f"out-{side}-{w}-{rep}"
                    with PeakRSS() as rss:
                        t1 = time.perf_counter()
                        res = pack(str(tmp / "jpeg"), str(out), cfg, workers=w, planner=lambda *a, p=plan: p)
                        keep(f"pack{side}w{w}", time.perf_counter() - t1)
                    peak[f"pack{side}w{w}"] = max(peak.get(f"pack{side}w{w}", 0), rss.peak)
                    growth[f"pack{side}w{w}"] = max(growth.get(f"pack{side}w{w}", 0), rss.peak - rss.first)
                    rows = sum(e["rows"] for e in res.index["shards"])
                    shards[side] = (len(res.index["shards"]), rows * SEQ_LEN * P * P * 3 / 1e6)
                    shutil.rmtree(out)
            print(f"repeat {rep + 1}/{args.repeat} done", flush=True)

        def rate(name: str) -> float:
            return n / best[name]

        results: dict = {
            "machine": machine,
            "command": " ".join(sys.argv),
            "images": n,
            "input_mb": round(mb, 1),
            "mean_mp": round(float(mp), 2),
            "full_decode_images_s": rate("full"),
        }
        print(f"\nmachine: {machine}; {n} JPEGs ({mp:.2f} MP mean, {mb:.0f} MB); best of {args.repeat}")
        print(f"(i)  full decode loop, 1 core: {rate('full'):7.1f} images/s {mb / best['full']:6.1f} MB/s")
        for side in sides:
            loop_r, w1, w2 = rate(f"loop{side}"), rate(f"pack{side}w1"), rate(f"pack{side}w2")
            write_r = rate(f"write{side}")
            r = {
                "loop_images_s": loop_r,
                "loop_mb_s": mb / best[f"loop{side}"],
                "loop_write_images_s": write_r,
                "writing_overhead_vs_loop": 1 - write_r / loop_r,
                "ray_overhead_vs_loop_write": 1 - w1 / write_r,
                "pack_w1_images_s": w1,
                "pack_w1_mb_s": mb / best[f"pack{side}w1"],
                "pack_w2_images_s": w2,
                "pack_w2_mb_s": mb / best[f"pack{side}w2"],
                "pack_w2_images_s_per_core": w2 / 2,
                "loop_vs_full_decode": loop_r / rate("full"),
                "pack_w1_vs_full_decode": w1 / rate("full"),
                "ray_write_overhead_vs_loop": 1 - w1 / loop_r,
                "speedup_2_workers": w2 / w1,
                "peak_rss_mb_w1": peak[f"pack{side}w1"] / 1e6,
                "peak_rss_mb_w2": peak[f"pack{side}w2"] / 1e6,
                "rss_growth_mb_w1": growth[f"pack{side}w1"] / 1e6,
                "rss_growth_mb_w2": growth[f"pack{side}w2"] / 1e6,
                "shards": shards[side][0],
                "shard_mb": round(shards[side][1], 1),
                "sequences": plans[side].num_sequences,
            }
            results[f"side_{side}"] = r
            print(
                f"side {side}: (ii) loop {loop_r:6.1f} img/s ({r['loop_vs_full_decode']:.2f}x full decode) | "
                f"(ii)+write, no Ray {write_r:6.1f} img/s (-{100 * r['writing_overhead_vs_loop']:.1f}%) | "
                f"(iii) pack 1 worker {w1:6.1f} img/s {r['pack_w1_mb_s']:5.1f} MB/s "
                f"({r['pack_w1_vs_full_decode']:.2f}x full decode, overhead vs loop "
                f"{100 * r['ray_write_overhead_vs_loop']:.1f}%) | 2 workers {w2:6.1f} img/s "
                f"({r['speedup_2_workers']:.2f}x) | {r['shards']} shards, {r['shard_mb']:.0f} MB | peak RSS "
                f"{r['peak_rss_mb_w1']:.0f} / {r['peak_rss_mb_w2']:.0f} MB (+{r['rss_growth_mb_w1']:.0f} / "
                f"+{r['rss_growth_mb_w2']:.0f} MB over idle Ray)"
            )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
