"""Time to plan: header scan of a real folder (local loop and Ray Data), and sampling + packing of a
large simulated set (sizes drawn like photos; no files). Run by hand:

    .venv/bin/python benchmarks/bench_plan.py --dir /work/shared/data/gcompris-cc0 --n 1000000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from packer.config import PackConfig
from packer.plan.headers import Headers
from packer.plan.planner import Scan, make_plan, scan_source
from packer.plan.sampling import sample_sizes
from packer.plan.sources import Listing


def simulated_scan(n: int, seed: int = 0) -> Scan:
    """n inputs with photo-like native sizes: longer side log-uniform 200..4000 px, aspect 1:3..3:1."""
    rng = np.random.default_rng(seed)
    longer = np.exp(rng.uniform(np.log(200), np.log(4000), n))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))  # w / h
    w = np.where(aspect >= 1, longer, longer * aspect).astype(np.int32)
    h = np.where(aspect >= 1, longer / aspect, longer).astype(np.int32)
    keys = [f"class{i % 1000:03d}/img_{i:08d}.jpg" for i in range(n)]
    listing = Listing("sim://", paths=keys, keys=keys, labels=np.arange(n, dtype=np.int64) % 1000)
    headers = Headers(np.arange(n, dtype=np.int64), w, h, np.ones(n, np.int8), ["JPEG"] * n, [""] * n)
    return Scan(listing, headers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="a real image folder to scan")
    ap.add_argument("--n", type=int, default=1_000_000, help="simulated images")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    cfg = PackConfig.model_validate({"token_drop": {"kind": "beta", "mean": 0.25, "max": 0.5}})
    if args.dir:
        runs = [(False, "local loop"), (True, "Ray Data incl. Ray start"), (True, "Ray Data, Ray running")]
        for use_ray, how in runs:
            t = time.perf_counter()
            scan = scan_source(args.dir, cfg, use_ray=use_ray, workers=args.workers)
            t_scan = time.perf_counter() - t
            t = time.perf_counter()
            plan = make_plan(scan, cfg)
            t_plan = time.perf_counter() - t
            how = how + (f", {args.workers} workers" if use_ray else "")
            print(
                f"{args.dir}: {scan.images_in} images, header scan {t_scan:.2f} s ({how}), "
                f"sample+pack {t_plan:.3f} s, {plan.num_sequences} sequences"
            )
    if not args.n:
        return
    t = time.perf_counter()
    scan = simulated_scan(args.n)
    print(f"simulated {args.n:,} images: built in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    s = sample_sizes(scan.headers.height, scan.headers.width, scan.listing.keys, cfg, 0)
    t_sample = time.perf_counter() - t
    for packer in ("bfd", "stream"):
        c = cfg.model_copy(update={"packing": cfg.packing.model_copy(update={"packer": packer})})
        t = time.perf_counter()
        plan = make_plan(scan, c)
        t_plan = time.perf_counter() - t
        pad = 1 - plan.n_kept.sum() / (plan.num_sequences * c.packing.seq_len)
        print(
            f"  {packer}: make_plan {t_plan:.2f} s (of which sampling {t_sample:.2f} s), "
            f"{plan.num_sequences:,} sequences, padding {pad:.4%}, mean tokens/image {s['n_kept'].mean():.1f}"
        )


if __name__ == "__main__":
    main()
