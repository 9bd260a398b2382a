"""Activation memory of one training forward+backward on CPU, per token, block and channel (run by hand).

Calibrates ``trainer/memory.py``'s ``ACT_FLOATS``: each case runs in a fresh process (peak RSS is a
per-process high-water mark), builds NaViT and a packed batch, runs a no-grad warm-up forward on
one row, then one forward+backward; the peak RSS growth minus the parameter gradients, divided by
``real tokens x depth x dim x 4 bytes``, is the number of fp32 floats kept per token-block-channel.

    .venv/bin/python benchmarks/bench_step_memory.py
"""

from __future__ import annotations

import gc
import platform
import resource
import subprocess
import sys
from pathlib import Path

CASES = (  # preset, rows, seq_len, images per row lo, hi
    ("tiny", 8, 256, 4, 16),
    ("tiny", 32, 256, 4, 16),
    ("tiny", 8, 256, 1, 1),
    ("tiny", 8, 1024, 1, 1),
    ("small", 8, 256, 4, 16),
)


def one(preset: str, rows: int, seq_len: int, lo: int, hi: int) -> str:
    import numpy as np
    import psutil
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_model import packed_rows

    from model import NaViT, NaViTConfig

    torch.set_num_threads(1)
    cfg = NaViTConfig.preset(preset, num_classes=10, patch_size=16)
    net = NaViT(cfg)
    batch = packed_rows(np.random.default_rng(0), rows, seq_len, lo, hi, cfg.patch_dim)
    real = int((batch["segment_ids"] > 0).sum())
    with torch.no_grad():
        net({k: v[:1] for k, v in batch.items()})
    gc.collect()
    rss = psutil.Process().memory_info().rss
    before = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss)
    net(batch).logits.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = sum(p.numel() for p in net.parameters()) * 4
    floats = (peak - before - grads) / (real * cfg.depth * cfg.dim * 4)
    grow = (peak - before) / 2**20
    return f"| {preset} | {rows} x {seq_len} | {lo}-{hi} | {real} | {grow:.0f} MiB | {floats:.1f} |"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(one(sys.argv[2], *map(int, sys.argv[3:7])))
        return
    print(f"# {platform.platform()}, python {platform.python_version()}, 1 torch thread")
    print("| preset | rows x seq_len | images/row | real tokens | peak RSS growth | floats/token/block/dim |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--one", *map(str, case)], capture_output=True, text=True, check=True
        )
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
