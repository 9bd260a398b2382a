"""NaViT vs ViT at equal training compute, on the demo's ``aspect`` synth task (run by hand).

The same model code (:class:`model.NaViT`, the demo's size) is trained three ways, each at the same
training-FLOP budgets, and every run is evaluated on the same held-out images at several resolutions:

- ``vit``        every image squashed to a fixed S x S square, (S/p)^2 tokens, one image per row:
                 a plain ViT's input pipeline.
- ``navit``      longest side drawn uniformly in [lo, hi] px per image and epoch, aspect ratio kept,
                 whole images packed next-fit into rows of L tokens (NaViT §3.2).
- ``navit-drop`` as ``navit``, and each image then drops a random fraction ~ U[0, max_drop] of its
                 tokens (random tokens, NaViT §3.1).

Training FLOPs are counted per image from its real (kept) token count ``n`` and the model's shape,
attention included, so that an image's cost depends on its own sequence length::

    forward(n) = 2·n·P·D                                  patch embedding (P = p·p·3)
               + depth · (24·n·D² + 4·n²·D)               qkv, proj, MLP (ratio 4); QKᵀ and AV
               + 2·D·C                                    head
    train(n)   = 3 · forward(n)                           backward ≈ 2 · forward

Padding is not counted: the CPU attention backend (``segment``) runs on real tokens only.
A budget is spent by drawing batches (epoch after epoch, a fresh shuffle and fresh resolution/drop
draws per epoch) until the cumulative FLOPs reach it; the cosine schedule spans exactly those steps.

The task (``navit synth --task aspect``): six classes = {ellipse, rectangle} x {tall 1:2, round 1:1,
wide 2:1}; the image aspect ratio is log-uniform in [1/2, 2], independent of the label. Squashing to
a square multiplies the shape's apparent aspect by 1/(image aspect), so for an ideal observer of
square-resized images the three aspect classes overlap: at most 2/3 of them can be told apart (the
``square-input ceiling`` in the plot), whatever the compute. This is the paper's argument for keeping
the aspect ratio, in its purest form; it is a constructed task, not evidence about natural images.

    .venv/bin/python benchmarks/navit_vs_vit.py --png docs/img/navit_vs_vit.png   # ~9 min on 2 cores
    .venv/bin/python benchmarks/navit_vs_vit.py --budgets 0.02 --n-train 300 --n-heldout 60  # smoke
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads that spin while waiting make each step ~20x slower when other jobs share the cores;
# must be set before torch loads OpenMP (override by setting it yourself).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import NaViT, NaViTConfig  # noqa: E402
from packer.build import decode  # noqa: E402
from packer.config import DecodeConfig  # noqa: E402
from packer.synth import ASPECT_CLASSES, ASPECT_SHAPES, synth_one  # noqa: E402
from trainer.evaluate import target_grid  # noqa: E402

ARMS = ("vit", "navit", "navit-drop")
SQUARE_CEILING = 2 / 3  # ideal observer of square-resized images on the aspect classes (see above)


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def load_split(seed: int, n: int, threads: int) -> tuple[list, np.ndarray]:
    """``navit synth --task aspect`` images (seed, 0..n-1), encoded and decoded exactly as the pack
    path does (JPEG/PNG, modes, EXIF → upright RGB). Returns (PIL images, labels (n,))."""
    cfg = DecodeConfig()

    def one(i: int):
        info, data = synth_one(seed, i, task="aspect")
        img, _ = decode.decode_rgb(data, None, cfg)
        return img, info.label

    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(one, range(n)))
    return [img for img, _ in out], np.array([lab for _, lab in out], np.int64)


@dataclass
class Arm:
    name: str
    patch: int
    seq_len: int  # tokens per row (vit: (S/p)^2, one image per row)
    per_step: int  # rows per step (navit) or images per step (vit)
    vit_side: int
    lo: int
    hi: int
    max_tokens: int
    max_drop: float

    @property
    def is_vit(self) -> bool:
        return self.name == "vit"


def image_flops(n: np.ndarray, cfg: NaViTConfig) -> np.ndarray:
    """Training FLOPs (n,) float64 of images with ``n`` real tokens each (formula in the docstring)."""
    n = np.asarray(n, np.float64)
    d, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    per_block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * hidden + 4 * n * n * d
    fwd = 2 * n * cfg.patch_dim * d + cfg.depth * per_block + 2 * d * max(cfg.num_classes, 1)
    if cfg.pool == "attn":  # probe query, keys/values, weights, projection and MLP of one vector
        fwd = fwd + 2 * n * d * 2 * d + 4 * n * d + 2 * d * d + 2 * 2 * d * hidden
    return 3.0 * fwd


def grids_for(arm: Arm, sizes: np.ndarray, sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patch grids (gh, gw) of images with native (w, h) ``sizes`` (n, 2) at longest side ``sides``."""
    if arm.is_vit:
        g = arm.vit_side // arm.patch
        return np.full(len(sizes), g), np.full(len(sizes), g)
    grids = [
        target_grid(int(h), int(w), float(s), arm.patch, arm.max_tokens)
        for (w, h), s in zip(sizes, sides, strict=True)
    ]
    gh, gw = (np.array(g) for g in zip(*grids, strict=True))
    return gh, gw


def plan_epoch(arm: Arm, sizes: np.ndarray, seed: int, epoch: int) -> list[list[tuple[int, int, int, int]]]:
    """One epoch's batches, no pixels: each batch a list of rows, each row a list of (image, gh, gw,
    kept tokens); fresh shuffle, resolution and drop draws per epoch."""
    rng = np.random.default_rng([seed, epoch, 7])
    order = rng.permutation(len(sizes))
    sides = rng.uniform(arm.lo, arm.hi, len(sizes))
    drops = rng.uniform(0.0, arm.max_drop, len(sizes)) if arm.max_drop > 0 else np.zeros(len(sizes))
    gh, gw = grids_for(arm, sizes, sides)
    full = gh * gw
    kept = np.maximum(1, np.floor(full * (1 - drops) + 0.5)).astype(int)
    rows: list[list[tuple[int, int, int, int]]] = []
    used = arm.seq_len + 1
    for i in order:
        k = int(kept[i])
        if arm.is_vit or used + k > arm.seq_len:
            rows.append([])
            used = 0
        rows[-1].append((int(i), int(gh[i]), int(gw[i]), k))
        used += k
    return [rows[s : s + arm.per_step] for s in range(0, len(rows) - arm.per_step + 1, arm.per_step)]


def materialise(arm: Arm, batch, images, labels, seed: int, epoch: int) -> tuple[dict, torch.Tensor]:
    """Pixels of a planned batch: (B, L) rows in the model's batch format, and labels in image order."""
    p = arm.patch
    b, length, dim = len(batch), arm.seq_len, p * p * 3
    patches = np.zeros((b, length, dim), np.uint8)
    seg = np.zeros((b, length), np.int32)
    pos = np.zeros((b, length, 2), np.int32)
    grid = np.zeros((b, length, 2), np.int32)
    labs = []
    for r, row in enumerate(batch):
        at = 0
        for s, (i, gh, gw, k) in enumerate(row, start=1):
            arr = decode.resize_exact(images[i], gw * p, gh * p)  # (gh·p, gw·p, 3)
            tok = decode.patchify(arr, p)  # (gh·gw, p·p·3)
            idx = np.arange(gh * gw)
            if k < gh * gw:  # a random subset of the tokens, in raster order
                rng = np.random.default_rng([seed, epoch, i, 11])
                idx = np.sort(rng.permutation(gh * gw)[:k])
            sl = slice(at, at + k)
            patches[r, sl] = tok[idx]
            seg[r, sl] = s
            pos[r, sl, 0], pos[r, sl, 1] = idx // gw, idx % gw
            grid[r, sl] = (gh, gw)
            labs.append(labels[i])
            at += k
    batch_t = {
        "patches": torch.from_numpy(patches),
        "segment_ids": torch.from_numpy(seg),
        "pos_hw": torch.from_numpy(pos),
        "grid_hw": torch.from_numpy(grid),
    }
    return batch_t, torch.tensor(labs)


def stream_for_budget(arm: Arm, sizes: np.ndarray, cfg: NaViTConfig, budget: float, seed: int):
    """Planned batches [(epoch, batch)] until the training FLOPs reach ``budget``; and their FLOPs."""
    out, total, epoch = [], 0.0, 0
    while total < budget:
        for batch in plan_epoch(arm, sizes, seed, epoch):
            kept = np.array([k for row in batch for (_, _, _, k) in row])
            total += float(image_flops(kept, cfg).sum())
            out.append((epoch, batch))
            if total >= budget:
                break
        epoch += 1
    return out, total


# ----------------------------------------------------------------------------------------------------
# Train / eval
# ----------------------------------------------------------------------------------------------------


def train_arm(arm: Arm, cfg: NaViTConfig, stream, images, labels, args) -> tuple[NaViT, dict]:
    torch.manual_seed(args.seed)
    net = NaViT(cfg)
    decay = [q for q in net.parameters() if q.ndim >= 2]
    no_decay = [q for q in net.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps = len(stream)
    warm = max(1, min(args.warmup, steps // 10))

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    net.train()
    t0 = time.perf_counter()
    n_img = n_tok = 0
    losses = []
    for epoch, planned in stream:
        batch, lab = materialise(arm, planned, images, labels, args.seed, epoch)
        loss = F.cross_entropy(net(batch).logits, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        n_img += len(lab)
        n_tok += int((batch["segment_ids"] > 0).sum())
    wall = time.perf_counter() - t0
    tail = losses[-max(1, steps // 10) :]
    return net.eval(), {
        "steps": steps,
        "images_seen": n_img,
        "tokens_seen": n_tok,
        "tokens_per_image": n_tok / max(n_img, 1),
        "train_s": round(wall, 1),
        "final_loss": float(np.mean(tail)),
    }


@torch.no_grad()
def evaluate(net: NaViT, arm: Arm, images, labels, resolution: int | None) -> dict:
    """Held-out accuracy at a resolution (None = native): vit squashes to r x r, navit keeps aspect."""
    p = arm.patch
    sizes = [im.size for im in images]
    if arm.is_vit:
        g = max(1, resolution // p)
        grids = [(g, g)] * len(images)
    else:
        cap = 1024
        grids = [target_grid(h, w, resolution, p, cap) for (w, h) in sizes]
    preds = []
    chunk = 64
    for s in range(0, len(images), chunk):
        members = list(range(s, min(s + chunk, len(images))))
        length = max(gh * gw for gh, gw in (grids[i] for i in members))
        eval_arm = Arm(arm.name, p, length, 0, arm.vit_side, arm.lo, arm.hi, length, 0.0)
        rows = [[(i, *grids[i], grids[i][0] * grids[i][1])] for i in members]  # one image per row
        batch, _ = materialise(eval_arm, rows, images, labels, 0, 0)
        preds.append(net(batch).logits.argmax(-1))
    pred = torch.cat(preds).numpy()
    kind = np.array([ASPECT_SHAPES[c][0] for c in ASPECT_CLASSES])
    aspect = np.array([ASPECT_SHAPES[c][1] for c in ASPECT_CLASSES])
    return {
        "resolution": "native" if resolution is None else resolution,
        "top1": float((pred == labels).mean()),
        "kind_acc": float((kind[pred] == kind[labels]).mean()),  # ellipse vs rectangle right
        "aspect_acc": float((aspect[pred] == aspect[labels]).mean()),  # tall / round / wide right
        "tokens_per_image": float(np.mean([gh * gw for gh, gw in grids])),
    }


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def markdown(results: list[dict], eval_res: list, headline: int) -> str:
    cols = [str(r) for r in eval_res]
    head = (
        "| arm | budget (TFLOP) | steps | images seen | tokens/img | train s | "
        + " | ".join(f"top-1 @{c}" for c in cols)
        + f" | kind @{headline} | aspect @{headline} |"
    )
    lines = [head, "|" + "---|" * (6 + len(cols) + 2)]
    for r in results:
        by = {str(e["resolution"]): e for e in r["eval"]}
        cells = [f"{by[c]['top1']:.3f}" if c in by else "–" for c in cols]
        h = by.get(str(headline), {})
        lines.append(
            f"| {r['arm']} | {r['flops'] / 1e12:.2f} | {r['steps']} | {r['images_seen']} | "
            f"{r['tokens_per_image']:.1f} | {r['train_s']:.0f} | "
            + " | ".join(cells)
            + f" | {h.get('kind_acc', float('nan')):.3f} | {h.get('aspect_acc', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], eval_res: list, headline: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = {"vit": "tab:red", "navit": "tab:blue", "navit-drop": "tab:green"}
    labels = {
        "vit": "ViT (square-resized, 1 image/row)",
        "navit": "NaViT (aspect kept, packed)",
        "navit-drop": "NaViT + token drop",
    }
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    for a in arms:
        rs = sorted((r for r in results if r["arm"] == a), key=lambda r: r["flops"])
        xs = [r["flops"] / 1e12 for r in rs]
        ys = [100 * next(e["top1"] for e in r["eval"] if e["resolution"] == headline) for r in rs]
        ax1.plot(xs, ys, marker="o", color=colours[a], label=labels[a])
        top = rs[-1]
        pts = [(str(e["resolution"]), 100 * e["top1"]) for e in top["eval"]]
        ax2.plot(
            [x for x, _ in pts],
            [y for _, y in pts],
            marker="o",
            color=colours[a],
            label=f"{labels[a]}, {top['flops'] / 1e12:.2g} TFLOP",
        )
    for ax in (ax1, ax2):
        ax.axhline(100 / len(ASPECT_CLASSES), color="grey", ls=":", lw=1)
        ax.axhline(100 * SQUARE_CEILING, color="tab:red", ls="--", lw=0.8, alpha=0.6)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_ylabel("held-out top-1 (%)")
    ax1.set_xscale("log")
    budgets = sorted({r["flops"] / 1e12 for r in results if r["arm"] == arms[0]})
    ax1.set_xticks(budgets, [f"{b:.2g}" for b in budgets])
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.text(
        ax1.get_xlim()[0],
        100 * SQUARE_CEILING + 1.5,
        " square-input ceiling (2/3)",
        fontsize=7,
        color="tab:red",
    )
    ax1.set_xlabel("training compute (TFLOP, counted per image from its real tokens)")
    ax1.set_title(f"accuracy vs training compute (eval at {headline} px)", fontsize=9)
    ax2.set_xlabel("eval resolution (longer side px; ViT: square side)")
    ax2.set_title("accuracy vs eval resolution (largest budget)", fontsize=9)
    ax1.legend(fontsize=7, loc="lower right")
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--budgets", default="0.75,1.5,3", help="training budgets in TFLOP, comma-separated")
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-heldout", type=int, default=600)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256, help="NaViT row length (tokens)")
    ap.add_argument("--rows", type=int, default=4, help="NaViT rows per step")
    ap.add_argument("--vit-side", type=int, default=64, help="ViT square side (px)")
    ap.add_argument("--vit-batch", type=int, default=64, help="ViT images per step (64 x 16 tokens = 1024)")
    ap.add_argument("--lo", type=int, default=32, help="NaViT longest side range (px)")
    ap.add_argument("--hi", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64, help="NaViT tokens per image cap")
    ap.add_argument("--max-drop", type=float, default=0.5, help="navit-drop: drop rate ~ U[0, this]")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--model-set", default="{}", help="extra NaViTConfig fields as JSON")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-res", default="32,48,64,96,128,native")
    ap.add_argument("--headline-res", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("navit_vs_vit.json"))
    ap.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--png", type=Path, default=Path("navit_vs_vit.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            raise SystemExit(f"--arms: unknown arm {a!r}; choose from {ARMS}")
    budgets = sorted(float(b) * 1e12 for b in args.budgets.split(","))
    eval_res = [None if r == "native" else int(r) for r in args.eval_res.split(",")]
    mcfg = NaViTConfig(
        patch_size=args.patch,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        num_classes=len(ASPECT_CLASSES),
        **json.loads(args.model_set),
    )

    t0 = time.perf_counter()
    train_imgs, train_labels = load_split(args.seed, args.n_train, args.threads)
    held_imgs, held_labels = load_split(args.seed + 1, args.n_heldout, args.threads)
    sizes = np.array([im.size for im in train_imgs])  # (n, 2) (w, h)
    print(f"data: {args.n_train} train + {args.n_heldout} held-out images in {time.perf_counter() - t0:.0f}s")

    results = []
    for name in arms:
        arm = Arm(
            name,
            args.patch,
            (args.vit_side // args.patch) ** 2 if name == "vit" else args.seq_len,
            args.vit_batch if name == "vit" else args.rows,
            args.vit_side,
            args.lo,
            args.hi,
            args.max_tokens,
            args.max_drop if name == "navit-drop" else 0.0,
        )
        for budget in budgets:
            stream, flops = stream_for_budget(arm, sizes, mcfg, budget, args.seed)
            net, info = train_arm(arm, mcfg, stream, train_imgs, train_labels, args)
            evals = [
                evaluate(net, arm, held_imgs, held_labels, r)
                for r in eval_res
                if not (arm.is_vit and r is None)
            ]
            row = {"arm": name, "budget": budget, "flops": flops, **info, "eval": evals}
            results.append(row)
            at = next((e for e in evals if e["resolution"] == args.headline_res), evals[0])
            print(
                f"{name:>10}  {flops / 1e12:5.2f} TFLOP  {info['steps']:4d} steps  "
                f"{info['images_seen']:6d} images  {info['tokens_per_image']:5.1f} tok/img  "
                f"{info['train_s']:6.0f}s  "
                f"top-1@{at['resolution']} {at['top1']:.3f}",
                flush=True,
            )

    total = time.perf_counter() - t0
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
        "torch": torch.__version__,
        "model": mcfg.to_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "total_s": round(total, 1),
        "square_input_ceiling": SQUARE_CEILING,
    }
    table = markdown(results, [r if r is not None else "native" for r in eval_res], args.headline_res)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.md:
        args.md.write_text(table + "\n")
    title = (
        f"NaViT vs ViT, same model ({args.depth}x{args.dim}, patch {args.patch}), "
        f"navit synth --task aspect, {args.n_train} train / {args.n_heldout} held-out"
    )
    plot(results, [r if r is not None else "native" for r in eval_res], args.headline_res, args.png, title)
    print()
    print(table)
    print(f"\ntotal {total:.0f}s; wrote {args.json}, {args.png}")


if __name__ == "__main__":
    main()
