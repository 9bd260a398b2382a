"""Padding and speed of the packing algorithms on simulated token counts (no images are read).

Run by hand (not a test):  .venv/bin/python benchmarks/bench_packing.py [--n 200000] [--seed 0]

Three setups, each 200k images by default (token counts simulated directly):

(a) paper's B/16 pretraining: longer side ~ U{64..256} px, aspect ratio from ASPECTS, patch 16,
    seq_len 256, no token dropping;
(b) longer side ~ U{64..512} px, aspect from ASPECTS, patch 16, seq_len 1024, Beta token drop as the
    project's config defines it: d = 0.5 * u, u ~ Beta(1, 3) (mean 0.25, concentration 4);
(c) native photo sizes from PHOTO_SIZES (phone / camera / web sizes, optionally web-downscaled),
    capped at 1024 tokens by shrinking, seq_len 4096, no dropping.

Grid per side = max(1, round(side / 16)); over the cap, both sides shrink by sqrt(cap / tokens) and
are floored. Prints a markdown table (sequences, excess over ceil(sum/L), padding, time, images/s),
the cutting-stock LP bound, and the cost of planning in 4 partitions instead of one.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packer.plan.binpack import exact_fill, lower_bound, lp_bound, pack, pack_stats  # noqa: E402

PATCH = 16
# (width:height, weight): landscape photo/video ratios, square, and their portrait versions.
ASPECTS = [(4 / 3, 0.30), (3 / 2, 0.15), (16 / 9, 0.10), (1.0, 0.15), (3 / 4, 0.20), (2 / 3, 0.10)]
# (width, height, weight) of common native sizes; one in three is portrait (sides swapped), and
# half of all images are web-downscaled by a factor ~ U(0.25, 1).
PHOTO_SIZES = [
    (4032, 3024, 0.15),  # 12 MP phone
    (4000, 3000, 0.05),
    (6000, 4000, 0.05),  # 24 MP camera
    (1920, 1080, 0.10),
    (1280, 720, 0.05),
    (2048, 1536, 0.05),
    (1600, 1200, 0.05),
    (1024, 768, 0.10),
    (800, 600, 0.10),
    (640, 480, 0.10),
    (500, 375, 0.10),  # typical web / ImageNet
    (1080, 1080, 0.05),
    (320, 240, 0.05),
]
ALGOS = ["next-fit", "first-fit", "bfd", "histogram", "stream", "bfd+exact-fill"]


def _grid(h: np.ndarray, w: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    gh = np.maximum(1, np.round(h / PATCH)).astype(np.int64)
    gw = np.maximum(1, np.round(w / PATCH)).astype(np.int64)
    over = gh * gw > cap
    s = np.sqrt(cap / (gh * gw))
    gh = np.where(over, np.maximum(1, np.floor(gh * s)), gh).astype(np.int64)
    gw = np.where(over, np.maximum(1, np.floor(gw * s)), gw).astype(np.int64)
    return gh, gw


def _sides(rng: np.random.Generator, n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    longer = rng.integers(lo, hi + 1, n).astype(np.float64)
    ar = np.array([a for a, _ in ASPECTS])[rng.choice(len(ASPECTS), n, p=[p for _, p in ASPECTS])]
    w = np.where(ar >= 1, longer, longer * ar)
    h = np.where(ar >= 1, longer / ar, longer)
    return h, w


def setup_a(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    h, w = _sides(rng, n, 64, 256)
    gh, gw = _grid(h, w, 256)
    full = gh * gw
    return full, full, 256


def setup_b(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    h, w = _sides(rng, n, 64, 512)
    gh, gw = _grid(h, w, 1024)
    full = gh * gw
    d = 0.5 * rng.beta(1.0, 3.0, n)
    kept = np.clip(np.round(full * (1 - d)), 1, full).astype(np.int64)
    return kept, full, 1024


def setup_c(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    sizes = np.array([(w, h) for w, h, _ in PHOTO_SIZES], dtype=np.float64)
    p = np.array([p for *_, p in PHOTO_SIZES])
    wh = sizes[rng.choice(len(sizes), n, p=p / p.sum())]
    portrait = rng.random(n) < 1 / 3
    w = np.where(portrait, wh[:, 1], wh[:, 0])
    h = np.where(portrait, wh[:, 0], wh[:, 1])
    scale = np.where(rng.random(n) < 0.5, rng.uniform(0.25, 1.0, n), 1.0)
    gh, gw = _grid(h * scale, w * scale, 1024)
    full = gh * gw
    return full, full, 4096


def _timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def run_setup(name: str, kept: np.ndarray, full: np.ndarray, L: int, M: int, repeat: int) -> list[str]:
    n = len(kept)
    lb = lower_bound(kept, L)
    (lp,), t_lp = _timed(lambda: (lp_bound(kept, L),), 1)
    rows = []
    print(
        f"setup {name}: n={n} seq_len={L} distinct lengths={len(np.unique(kept))} "
        f"mean tokens={kept.mean():.1f} ceil(sum/L)={lb} LP bound={lp:.2f} (ceil {int(np.ceil(lp - 1e-6))}, "
        f"{t_lp:.2f} s)",
        file=sys.stderr,
    )
    for algo in ALGOS:
        if algo == "bfd+exact-fill":

            def run():
                off, mem = pack(kept, L, M, "bfd")
                return off, mem, exact_fill(off, mem, kept, full, L)

            (off, mem, tokens), t = _timed(run, repeat)
        else:
            (off, mem), t = _timed(lambda a=algo: pack(kept, L, M, a), repeat if algo != "histogram" else 1)
            tokens = kept
        st = pack_stats(tokens[mem], off, L)
        s = st.sequences
        lp_int = np.ceil(lp - 1e-6)
        rows.append(
            f"| {name} | {algo} | {s:,} | {100 * (s - lb) / lb:.3f}% | {100 * (s - lp_int) / lp_int:.3f}% | "
            f"{100 * st.padding_fraction:.4f}% | {t:.3f} | {n / t:,.0f} |"
        )
        print(rows[-1], file=sys.stderr)
    # Planning per partition: 4 x n/4 images packed independently by bfd, sequences concatenated.
    parts = np.array_split(np.arange(n), 4)
    s_parts = sum(len(pack(kept[p], L, M, "bfd")[0]) - 1 for p in parts)
    s_one = len(pack(kept, L, M, "bfd")[0]) - 1
    pad = lambda s: 1 - kept.sum() / (s * L)  # noqa: E731
    part_row = (
        f"| {name} | {s_one:,} | {100 * pad(s_one):.4f}% | {s_parts:,} | {100 * pad(s_parts):.4f}% | "
        f"{s_parts - s_one:+d} |"
    )
    summary = (
        f"| {name} | {n:,} | {L} | {len(np.unique(kept))} | {kept.mean():.1f} | {lb:,} | {lp:,.2f} "
        f"| {t_lp:.2f} |"
    )
    return rows, part_row, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="images per setup")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=64, help="max images per sequence")
    ap.add_argument("--repeat", type=int, default=3, help="timing: best of this many runs")
    ap.add_argument("--setups", default="abc")
    args = ap.parse_args()
    setups = {"a": setup_a, "b": setup_b, "c": setup_c}
    rows, parts, summaries = [], [], []
    for i, key in enumerate(args.setups):
        rng = np.random.default_rng([args.seed, i])
        kept, full, L = setups[key](rng, args.n)
        r, p, s = run_setup(f"({key})", kept, full, L, args.max_images, args.repeat)
        rows += r
        parts.append(p)
        summaries.append(s)
    print(
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n"
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}; one process, timings = best of "
        f"{args.repeat} (histogram: 1)\n"
    )
    print(
        "| setup | images | seq_len | distinct lengths | mean tokens | ceil(sum/L) | LP bound | LP time s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(summaries) + "\n")
    print(
        "| setup | algorithm | sequences | over ceil(sum/L) | over ceil(LP) | padding | time s | images/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows) + "\n")
    print(
        "| setup | bfd, 1 plan: sequences | padding | 4 partitions: sequences | padding | extra sequences |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
