"""Cost and run-to-run determinism of formulations of the learned position-embedding lookup (run by hand).

The lookup is ``φy[by] + φx[bx]``: two (K, D) tables, (T,) bucket indices per axis. Its *backward*
scatters T gradient rows into K table rows. Candidates:

- ``index``        — ``table[idx]`` (advanced indexing; backward = ``index_put_(accumulate=True)``,
                     which on CPU splits the rows over threads and adds atomically: the summation
                     order, hence the last bits, change from run to run with more than one thread);
- ``embedding``    — ``F.embedding(idx, table)`` (backward sorts the indices, one thread per table row);
- ``index_select`` — ``table.index_select(0, idx)`` (backward = ``index_add_``, in index order);
- ``one_hot``      — ``one_hot(idx, K) @ table`` (a (T, K) x (K, D) matmul each way).

For each: forward+backward time (the best of ``--iters``: on a shared machine the minimum is the
least disturbed by other processes) at the token counts of real micro-batches (tiny preset,
D = 192, K = 64), with 1 and 2 intra-op threads, and how many of ``--repeats`` backward passes gave a table
gradient different from the first one. Then one training step of the tiny preset with the current
``model/posemb.py`` vs the same model with its lookup swapped back to ``index``.

    .venv/bin/python benchmarks/bench_posemb.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def lookup(kind: str, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(K, D) table, (T,) int64 indices -> (T, D) rows."""
    if kind == "index":
        return table[idx]
    if kind == "embedding":
        return F.embedding(idx, table)
    if kind == "index_select":
        return table.index_select(0, idx)
    if kind == "one_hot":
        return F.one_hot(idx, table.shape[0]).to(table.dtype) @ table
    raise ValueError(kind)


def time_op(kind: str, tokens: int, dim: int, buckets: int, iters: int) -> tuple[float, int, int]:
    """Best fwd+bwd ms of φy[by] + φx[bx]; and (differing runs, runs) of the table gradients."""
    g = torch.Generator().manual_seed(0)
    by = torch.randint(0, buckets, (tokens,), generator=g)
    bx = torch.randint(0, buckets, (tokens,), generator=g)
    up = torch.randn(tokens, dim, generator=g)  # the gradient flowing into the lookup
    ty = torch.randn(buckets, dim, generator=g, requires_grad=True)
    tx = torch.randn(buckets, dim, generator=g, requires_grad=True)

    def step() -> torch.Tensor:
        ty.grad = tx.grad = None
        (lookup(kind, ty, by) + lookup(kind, tx, bx)).backward(up)
        return torch.cat([ty.grad, tx.grad])

    ref = step()
    for _ in range(3):
        step()
    times, differ = [], 0
    for _ in range(iters):
        t0 = time.perf_counter()
        grad = step()
        times.append((time.perf_counter() - t0) * 1e3)
        differ += not torch.equal(grad, ref)
    return min(times), differ, iters


def model_step_ms(kind: str | None, rows: int, seq_len: int, iters: int) -> float:
    """Best ms of one forward+backward of the tiny preset (depth 12, D 192) on packed rows, with
    the position lookup swapped for ``kind`` (None: ``model/posemb.py`` as it is)."""
    import numpy as np
    from bench_model import packed_rows

    from model import NaViT, NaViTConfig
    from model import posemb as pe

    torch.manual_seed(0)
    cfg = NaViTConfig.preset("tiny", num_classes=10, patch_size=16)
    net = NaViT(cfg)
    batch = packed_rows(np.random.default_rng(0), rows, seq_len, 4, 16, cfg.patch_dim)
    saved = pe._lookup
    if kind is not None:
        pe._lookup = lambda table, idx: lookup(kind, table, idx.reshape(-1)).view(*idx.shape, -1)
    try:
        times = []
        for i in range(iters + 2):  # 2 warm-up steps
            net.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            net(batch).logits.sum().backward()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        pe._lookup = saved
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=50, help="timed passes per cell")
    ap.add_argument("--model-iters", type=int, default=5, help="timed model steps per cell")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--buckets", type=int, default=64)
    args = ap.parse_args()
    print(
        f"# {platform.platform()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(f"# lookup φy[by] + φx[bx]: D={args.dim}, K={args.buckets}, fwd+bwd best of {args.iters}")
    print("| tokens | threads | index | embedding | index_select | one_hot |")
    print("|---|---|---|---|---|---|")
    kinds = ("index", "embedding", "index_select", "one_hot")
    for tokens in (1024, 2048, 8192):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cells = []
            for kind in kinds:
                ms, differ, n = time_op(kind, tokens, args.dim, args.buckets, args.iters)
                cells.append(f"{ms:.3f} ms ({differ}/{n} differ)")
            print(f"| {tokens} | {threads} | " + " | ".join(cells) + " |")
    print()
    print(f"# tiny preset fwd+bwd, 8 rows x seq_len 256 (4-16 images/row), best of {args.model_iters}")
    print("| threads | index (old) | model/posemb.py |")
    print("|---|---|---|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        old = model_step_ms("index", 8, 256, args.model_iters)
        new = model_step_ms(None, 8, 256, args.model_iters)
        print(f"| {threads} | {old:.1f} ms | {new:.1f} ms |")


if __name__ == "__main__":
    main()
