"""Forward+backward throughput of NaViT's attention backends on packed rows (run by hand).

CPU (default): the tiny and small presets at seq_len 256 and 1024, rows packed with 4-16 images of
mixed sizes and aspect ratios, for each CPU backend, against

- ``ceiling``   — the same model on full rows of real tokens with no mask at all (a plain ViT pass
                  over sequences of length L);
- ``navit-mask``— a dense-mask forward in the style of vit-pytorch's ``na_vit``: a boolean (L, L)
                  mask built from image ids at every forward, explicit ``q @ kᵀ``, ``masked_fill``,
                  softmax, ``@ v`` (rewritten here, not copied).

Throughput is counted in *real* (non-padding) tokens per second. ``--gpu``: bf16 ViT-B/16 at seq_len
1024 with ``flex`` and ``varlen``, tokens/s and model FLOPs utilisation (FLOPs counted analytically).

    .venv/bin/python benchmarks/bench_model.py                 # CPU table
    .venv/bin/python benchmarks/bench_model.py --flex          # + flex compiled on CPU (slow compile)
    .venv/bin/python benchmarks/bench_model.py --gpu           # CUDA only
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import NaViT, NaViTConfig  # noqa: E402
from model.attention import Layout, build_layout  # noqa: E402


def packed_rows(
    rng: np.random.Generator, rows: int, seq_len: int, lo: int, hi: int, patch_dim: int
) -> dict[str, torch.Tensor]:
    """Rows holding lo..hi images each (uniform), sizes from a Dirichlet split of ~97% of the row,
    each image a grid gh x gw with a random aspect ratio in [1/2, 2]."""
    seg = np.zeros((rows, seq_len), np.int32)
    pos = np.zeros((rows, seq_len, 2), np.int32)
    grid = np.zeros((rows, seq_len, 2), np.int32)
    for r in range(rows):
        k = int(rng.integers(lo, hi + 1))
        sizes = rng.dirichlet(np.full(k, 3.0)) * seq_len * 0.97
        off = 0
        for s, size in enumerate(sizes, 1):
            aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
            gh = max(1, round(math.sqrt(max(size, 1) * aspect)))
            gw = max(1, int(max(size, 1) // gh))
            n = gh * gw
            if off + n > seq_len:
                break
            idx = np.arange(n)
            seg[r, off : off + n] = s
            pos[r, off : off + n, 0], pos[r, off : off + n, 1] = idx // gw, idx % gw
            grid[r, off : off + n] = (gh, gw)
            off += n
    patches = rng.integers(0, 256, (rows, seq_len, patch_dim), dtype=np.uint8)
    return {
        "patches": torch.from_numpy(patches),
        "segment_ids": torch.from_numpy(seg),
        "pos_hw": torch.from_numpy(pos),
        "grid_hw": torch.from_numpy(grid),
    }


def full_rows(rng: np.random.Generator, rows: int, seq_len: int, patch_dim: int) -> dict[str, torch.Tensor]:
    """Every token real: one 'image' per row, a 1 x L grid."""
    seg = np.ones((rows, seq_len), np.int32)
    pos = np.stack([np.zeros(seq_len), np.arange(seq_len)], -1).astype(np.int32)
    return {
        "patches": torch.from_numpy(rng.integers(0, 256, (rows, seq_len, patch_dim), dtype=np.uint8)),
        "segment_ids": torch.from_numpy(seg),
        "pos_hw": torch.from_numpy(np.broadcast_to(pos, (rows, seq_len, 2)).copy()),
        "grid_hw": torch.from_numpy(
            np.broadcast_to(np.array([1, seq_len], np.int32), (rows, seq_len, 2)).copy()
        ),
    }


class NaViTStyleMask(Layout):
    """vit-pytorch na_vit-style attention: explicit scores + boolean mask built from image ids."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        scores = qt @ kt.transpose(-1, -2) * qt.shape[-1] ** -0.5  # (B, H, L, L)
        scores = scores.masked_fill(~self.dense_mask, -torch.finfo(scores.dtype).max)
        return (scores.softmax(-1) @ vt).transpose(1, 2)  # (B, L, H, d)


def use_layout(net: NaViT, method: str) -> None:
    """Point the model at one attention variant (all share the same weights and trunk)."""
    if method == "ceiling":  # dense backend without any mask
        net.layout = lambda seg, host=None: build_layout(seg, "dense", with_dense_mask=False, host=host)  # type: ignore[method-assign]
    elif method == "navit-mask":

        def lay(seg: torch.Tensor, host: Any = None) -> Layout:
            base = build_layout(seg, "dense", with_dense_mask=False, host=host)
            s = seg.long()  # the mask is rebuilt from image ids every forward, as na_vit does
            mask = (s[:, :, None] == s[:, None, :]) & (s[:, :, None] > 0) & (s[:, None, :] > 0)
            base.__class__ = NaViTStyleMask
            base.dense_mask = mask[:, None] | torch.eye(s.shape[1], dtype=torch.bool)  # no empty rows
            return base

        net.layout = lay  # type: ignore[method-assign]
    else:
        backend, _, steps = method.partition(":")
        net.cfg.attention = backend
        net.cfg.segment_buckets = int(steps) if steps else NaViTConfig.segment_buckets
        net.__dict__.pop("layout", None)


def step_time(net: NaViT, batch: dict[str, torch.Tensor], reps: int, warmup: int, sync=lambda: None) -> float:
    times = []
    for i in range(warmup + reps):
        sync()
        t0 = time.perf_counter()
        out = net(batch)
        out.logits.float().square().mean().backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        net.zero_grad(set_to_none=True)
    return statistics.median(times)


def cpu_table(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    methods = ["ceiling", "navit-mask", "dense", "segment:0", "segment"] + (["flex"] if args.flex else [])
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"# {os.cpu_count()} logical CPUs; tokens per batch ~{args.tokens}; "
        f"median of {args.reps} after warmup"
    )
    print("| preset | seq_len | imgs/row | fill | method | real tok/s | vs ceiling | vs navit-mask |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for seq_len in args.seq_lens:
            rng = np.random.default_rng(0)
            torch.manual_seed(0)
            net = NaViT(NaViTConfig.preset(preset, num_classes=1000)).train()
            rows = max(1, args.tokens // seq_len)
            packed = packed_rows(rng, rows, seq_len, 4, 16, net.cfg.patch_dim)
            full = full_rows(rng, rows, seq_len, net.cfg.patch_dim)
            seg = packed["segment_ids"]
            real = int((seg > 0).sum())
            ipr = num_imgs = len(build_layout(seg, "segment").lengths)
            ipr = num_imgs / rows
            res: dict[str, float] = {}
            for m in methods:
                use_layout(net, m)
                batch = full if m == "ceiling" else packed
                n_real = rows * seq_len if m == "ceiling" else real
                try:
                    t = step_time(net, batch, args.reps, args.warmup + (1 if m == "flex" else 0))
                except Exception as e:  # flex may be unavailable on a CPU build
                    print(f"| {preset} | {seq_len} | | | {m} | failed: {type(e).__name__} | | |")
                    continue
                res[m] = n_real / t
                print(
                    f"| {preset} | {seq_len} | {ipr:.1f} | {real / (rows * seq_len):.0%} | {m} | "
                    f"{res[m]:,.0f} | {res[m] / res['ceiling']:.2f}x | "
                    f"{res[m] / res['navit-mask']:.2f}x |"
                    if "navit-mask" in res
                    else f"| {preset} | {seq_len} | {ipr:.1f} | {real / (rows * seq_len):.0%} | {m} | "
                    f"{res[m]:,.0f} | {res[m] / res['ceiling']:.2f}x | |",
                    flush=True,
                )


def model_flops(cfg: NaViTConfig, lengths: np.ndarray, pool: bool = True) -> float:
    """Forward+backward FLOPs (multiply-add = 2) of the matmuls of one batch: 3x the forward."""
    d, t = cfg.dim, float(lengths.sum())
    h = cfg.dim * cfg.mlp_ratio
    per_token = 2 * cfg.patch_dim * d + cfg.depth * (2 * 4 * d * d + 2 * 2 * d * h)  # embed, qkv+proj, mlp
    attn = cfg.depth * 4 * d * float((lengths.astype(np.float64) ** 2).sum())  # q kᵀ and p v per image
    pool_f = (2 * 2 * d * d + 4 * d) * t if pool else 0.0  # k, v projections + scores/weighted sum
    return 3.0 * (per_token * t + attn + pool_f)


def gpu_table(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("--gpu: no CUDA device on this machine; skipped (the CPU table runs without --gpu)")
        return
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = args.peak_tflops or (
        989.0 if ("H100" in name or "H200" in name) else 312.0 if "A100" in name else 0
    )
    print(f"# {name}, torch {torch.__version__}, peak bf16 {peak or '?'} TFLOP/s (dense)")
    print("| model | seq_len | rows | imgs/row | method | real tok/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    cfg = NaViTConfig.preset("base", num_classes=1000)
    net = NaViT(cfg).to(dev).train()
    batch = {k: v.to(dev) for k, v in packed_rows(rng, args.gpu_rows, 1024, 4, 16, cfg.patch_dim).items()}
    lengths = build_layout(batch["segment_ids"], "segment").lengths
    flops = model_flops(cfg, lengths)
    for m in ["flex", "varlen", "segment"]:
        use_layout(net, m)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            t = step_time(net, batch, args.reps, 3, torch.cuda.synchronize)
        tf = flops / t / 1e12
        mfu = f"{tf / peak:.0%}" if peak else "?"
        ipr = len(lengths) / args.gpu_rows
        print(
            f"| ViT-B/16 bf16 | 1024 | {args.gpu_rows} | {ipr:.1f} | {m} | "
            f"{lengths.sum() / t:,.0f} | {tf:.0f} | {mfu} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per batch (rows = tokens // seq_len)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see docs/model.md)")
    ap.add_argument("--flex", action="store_true", help="also time flex_attention compiled on CPU")
    ap.add_argument("--gpu", action="store_true", help="bf16 ViT-B/16 on CUDA (flex, varlen, segment)")
    ap.add_argument("--gpu-rows", type=int, default=32)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device bf16 peak for MFU")
    args = ap.parse_args()
    if args.gpu:
        gpu_table(args)
    else:
        cpu_table(args)


if __name__ == "__main__":
    main()
