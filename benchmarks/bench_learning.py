"""Learning speed: NaViT vs a plain PyTorch ViT of the same size, same data, same recipe (run by hand).

Both models train on the procedurally generated 10-class 28x28 grayscale digits of
``benchmarks/glyphs.py`` (10k train / 2k held-out; no dataset can be downloaded here) with patch 4
(a 7x7 grid, 49 tokens), 4 blocks x width 128 x 4 heads, AdamW (lr 1e-3, weight decay 0.05 on
matrices only, as the trainer), grad-norm clip 1.0, linear warmup (10%) then cosine to 0, and the
same steps x images per step, seed, and order of training images. NaViT gets its images through
:func:`model.pack_images` (4 whole images per packed row of 196 tokens, segment attention) exactly
as it would from packed shards; the reference gets a (B, 28, 28, 1) tensor. Reported: held-out
top-1 on all 2k held-out images (and train top-1 on 2k training images) after the last step.

    .venv/bin/python benchmarks/bench_learning.py               # reference vs ours before/after, seeds 0 1 2
    .venv/bin/python benchmarks/bench_learning.py --ablation --dim 64 --depth 2 --heads 2 --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/bench_learning.py --variants ref,default+patch_norm --seeds 0

A variant is a name from ``VARIANTS`` (NaViTConfig overrides), ``ref`` (the reference ViT),
``ref+pos0.5`` (the reference with its position table initialised at std 0.5, as ours) or
``linear`` (logistic regression on raw pixels, a floor for the task).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

from glyphs import glyph_digits  # noqa: E402
from reference_vit import ReferenceViT  # noqa: E402

from model import LEGACY_DEFAULTS, NaViT, NaViTConfig, pack_images  # noqa: E402

DIFFICULTY = 0.55  # glyph distortion; a linear classifier on raw pixels gets ~0.8 held-out


@dataclass
class Task:
    """Square grayscale images (N, S, S) uint8 with labels, split into train and held-out."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int = 10

    @property
    def side(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def pixel_stats(self) -> tuple[float, float]:
        """Mean and std of the training pixels in [0, 1] units (the models' pixel_mean/pixel_std)."""
        x = self.x_train.astype(np.float64) / 255.0
        return float(x.mean()), float(x.std())


def glyph_task(n_train: int = 10_000, n_test: int = 2_000, seed: int = 0) -> Task:
    return Task(*glyph_digits(n_train, n_test, seed=seed, difficulty=DIFFICULTY))


@dataclass
class Recipe:
    steps: int = 400
    batch: int = 20  # images per step
    lr: float = 1e-3
    weight_decay: float = 0.05
    clip: float = 1.0
    warmup_frac: float = 0.1
    patch: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    images_per_row: int = 4  # NaViT: whole images packed per row


# NaViTConfig overrides per ablation variant. "default" = today's NaViTConfig defaults; "legacy" =
# the model before issue 11 (LEGACY_DEFAULTS: what an old checkpoint without the new fields means).
# "legacy+X" changes one thing from legacy, "default+X" one thing from today's defaults. Keys that
# start with "_" are applied by this script after the model is built (not NaViTConfig fields).
_L = dict(LEGACY_DEFAULTS)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "legacy": _L,
    "legacy+mean_pool": {**_L, "pool": "mean"},
    "legacy+xavier": {**_L, "init": "xavier"},
    "legacy+torch_init": {**_L, "init": "torch"},
    "legacy+posemb_std0.5": {**_L, "posemb_std": 0.5},
    "legacy+patch_norm": {**_L, "patch_norm": True},
    "legacy+xavier+mean_pool": {**_L, "init": "xavier", "pool": "mean"},
    "default+trunc_normal": {"init": "trunc_normal"},
    "default+torch_init": {"init": "torch"},
    "default+posemb_std0.02": {"posemb_std": 0.02},
    "default+posemb_std0.2": {"posemb_std": 0.2},
    "default+posemb_std1": {"posemb_std": 1.0},
    "default+sincos": {"posemb": "sincos"},
    "default+attn_pool": {"pool": "attn"},
    "default+attn_pool+sincos": {"pool": "attn", "posemb": "sincos"},
    "default+patch_norm": {"patch_norm": True},
    "default+qk_norm": {"qk_norm": True},
    "default+zero_head": {"_zero_head": True},  # big_vision's zero-initialised classifier
}
EXTRA = ("ref", "ref+pos0.5", "linear")  # the reference ViT (plain, and with a std-0.5 table), a floor


def navit_config(task: Task, r: Recipe, **overrides: Any) -> NaViTConfig:
    mean, std = task.pixel_stats
    base = dict(
        patch_size=r.patch,
        channels=1,
        dim=r.dim,
        depth=r.depth,
        heads=r.heads,
        num_classes=task.num_classes,
        pixel_mean=(mean,),
        pixel_std=(std,),
    )
    return NaViTConfig(**{**base, **overrides})


def reference_model(task: Task, r: Recipe, pos_std: float = 0.02) -> ReferenceViT:
    mean, std = task.pixel_stats
    return ReferenceViT(
        task.side,
        r.patch,
        1,
        task.num_classes,
        r.dim,
        r.depth,
        r.heads,
        pixel_mean=(mean,),
        pixel_std=(std,),
        pos_std=pos_std,
    )


class _Packed(torch.nn.Module):
    """Adapter: (B, S, S) uint8 images → NaViT logits through pack_images (rows of whole images)."""

    def __init__(self, net: NaViT, images_per_row: int) -> None:
        super().__init__()
        self.net, self.per_row = net, images_per_row

    def forward(self, images: np.ndarray) -> torch.Tensor:
        p = self.net.cfg.patch_size
        n_tok = (images.shape[1] // p) * (images.shape[2] // p)
        batch = pack_images(list(images[..., None]), p, n_tok * self.per_row, channels=1)
        return self.net(batch).logits  # (B, classes), images in input order


class _Dense(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: np.ndarray) -> torch.Tensor:
        return self.net(torch.from_numpy(images[..., None]))


class _Linear(torch.nn.Module):
    """Logistic regression on standardised raw pixels: the floor of the task."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        d = task.side * task.side
        x = torch.from_numpy(task.x_train.reshape(len(task.x_train), d)).float()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0) + 1.0)
        self.fc = torch.nn.Linear(d, task.num_classes)

    def forward(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images.reshape(len(images), -1)).float()
        return self.fc((x - self.mean) / self.std)


def build(variant: str, task: Task, r: Recipe, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same init stream for every model of a seed
    if variant == "ref":
        return _Dense(reference_model(task, r))
    if variant == "ref+pos0.5":  # the reference with NaViT's position-table init
        return _Dense(reference_model(task, r, pos_std=0.5))
    if variant == "linear":
        return _Linear(task)
    over = {k: v for k, v in VARIANTS[variant].items() if not k.startswith("_")}
    net = NaViT(navit_config(task, r, **over))
    if VARIANTS[variant].get("_zero_head"):
        torch.nn.init.zeros_(net.head.weight)
    return _Packed(net, r.images_per_row)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # The trainer's rule (trainer/loop.py): decay matrices and tables, not biases/norm gains/probes.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, chunk: int = 400) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(x), chunk):
        hits += int((model(x[i : i + chunk]).argmax(-1) == torch.from_numpy(y[i : i + chunk])).sum())
    model.train()
    return hits / len(x)


def train_eval(variant: str, task: Task, r: Recipe, seed: int, eval_train: bool = True) -> dict[str, float]:
    """Train ``variant`` for ``r.steps`` steps; held-out and (``eval_train``) train top-1 on up to 2k
    training images, plus the mean loss of the last 20 steps."""
    model = build(variant, task, r, seed)
    opt = torch.optim.AdamW(param_groups(model, r.weight_decay), lr=r.lr)
    warm = max(1, round(r.warmup_frac * r.steps))

    def lr_at(s: int) -> float:  # linear warmup, then cosine to 0 (the trainer's schedule)
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + np.cos(np.pi * min(1.0, (s - warm) / max(1, r.steps - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order = np.random.default_rng([seed, 1]).integers(0, len(task.x_train), (r.steps, r.batch))
    losses = []
    t0 = time.perf_counter()
    model.train()
    for s in range(r.steps):
        idx = order[s]
        logits = model(task.x_train[idx])
        loss = F.cross_entropy(logits, torch.from_numpy(task.y_train[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if r.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    n_eval = min(2000, len(task.x_train))
    return {
        "heldout": accuracy(model, task.x_test, task.y_test),
        "train": accuracy(model, task.x_train[:n_eval], task.y_train[:n_eval])
        if eval_train
        else float("nan"),
        "loss": float(np.mean(losses[-20:])),
        "seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variants", default="ref,legacy,default", help="comma-separated VARIANTS or EXTRA names"
    )
    ap.add_argument("--ablation", action="store_true", help="every variant in EXTRA and VARIANTS")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=Recipe.steps)
    ap.add_argument("--batch", type=int, default=Recipe.batch)
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--n-train", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=Recipe.dim)
    ap.add_argument("--depth", type=int, default=Recipe.depth)
    ap.add_argument("--heads", type=int, default=Recipe.heads)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [*EXTRA, *VARIANTS] if args.ablation else args.variants.split(",")
    for v in variants:
        if v not in VARIANTS and v not in EXTRA:
            sys.exit(f"unknown variant {v!r}: choose from {sorted(VARIANTS)} or {EXTRA}")
    r = Recipe(
        steps=args.steps, batch=args.batch, lr=args.lr, dim=args.dim, depth=args.depth, heads=args.heads
    )
    task = glyph_task(args.n_train)
    print(
        f"# glyph digits {len(task.x_train)}/{len(task.x_test)}, {r.steps} steps x {r.batch} images, "
        f"lr {r.lr}, {r.depth} blocks x {r.dim} x {r.heads} heads, seeds {args.seeds}; "
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
        flush=True,
    )
    print("| variant | params | held-out top-1 (per seed) | mean | train top-1 | final loss | s/run |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        res = [train_eval(v, task, r, s) for s in args.seeds]
        accs = [x["heldout"] for x in res]
        print(
            f"| {v} | {res[0]['params']:,} | {' '.join(f'{a:.3f}' for a in accs)} | "
            f"{statistics.mean(accs):.3f} | {statistics.mean(x['train'] for x in res):.3f} | "
            f"{statistics.mean(x['loss'] for x in res):.3f} | "
            f"{statistics.mean(x['seconds'] for x in res):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
