"""Held-out accuracy with and without augmentation (issue 11 item 3), run by hand.

A small-data regime where a tiny NaViT overfits: the procedurally generated 10-class glyph digits
(benchmarks/glyphs.py, 28x28 grey, saved as PNG), N training images, a disjoint held-out set. Each
variant goes through the real path — `navit pack` (packer.build.pipeline, embedded Ray) with or without
pack-time crop (and a fresh crop every pack epoch), then `navit train` (trainer.loop) with or without
token-level mixup/cutmix — and is scored by `navit eval`'s evaluate_folder on the held-out folder at
native resolution (and on the training folder, to show the memorisation gap). No flips: digits are
not mirror-symmetric.

    python benchmarks/bench_augment.py --train 1000 --test 1000 --steps 1500 --out /tmp/bench-aug

Prints one line per variant and a JSON summary (also written to OUT/results.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {
    "none": ({}, {}),
    "crop": ({"crop_scale": (0.5, 1.0), "crop_ratio": (0.8, 1.25)}, {}),
    "mix": ({}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}),
    "crop+mix": (
        {"crop_scale": (0.5, 1.0), "crop_ratio": (0.8, 1.25)},
        {"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
    ),
    "mixup0.2": ({}, {"mixup_alpha": 0.2}),
    "crop+mixup0.2": ({"crop_scale": (0.5, 1.0), "crop_ratio": (0.8, 1.25)}, {"mixup_alpha": 0.2}),
}


def write_folder(out: Path, images, labels) -> Path:
    from PIL import Image

    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = out / str(int(lab))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1000, help="training images")
    ap.add_argument("--test", type=int, default=1000, help="held-out images")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=4, help="packed rows of 256 tokens per step")
    ap.add_argument("--pack-epochs", type=int, default=30, help="pack epochs (fresh crops) when cropping")
    ap.add_argument("--variants", default="none,crop,mix,crop+mix", help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--model",
        default='{"depth": 4, "dim": 128, "heads": 4}',
        help="NaViTConfig overrides (JSON) of the tiny preset",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/navit-bench-augment"))
    args = ap.parse_args()

    import torch
    from glyphs import glyph_digits

    from packer.build.pipeline import pack
    from packer.config import PackConfig
    from trainer.config import load_train_config
    from trainer.data import open_source
    from trainer.evaluate import evaluate_folder, load_model
    from trainer.loop import train

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = glyph_digits(args.train, args.test, seed=args.seed)
    train_dir = args.out / "train"
    test_dir = args.out / "test"
    if not train_dir.exists():
        write_folder(train_dir, xtr, ytr)
        write_folder(test_dir, xte, yte)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results = []
    for name in args.variants.split(","):
        aug, mix = VARIANTS[name]
        cfg = PackConfig.model_validate(
            {
                "seed": args.seed,
                "resolution": {"kind": "uniform", "lo": 28, "hi": 28},  # every crop back to 28 px
                "packing": {"seq_len": 256, "patch_size": 4, "max_images_per_seq": 64},
                "augment": aug,
                "output": {"epochs": args.pack_epochs if aug else 1},
            }
        )
        pack_dir = args.out / f"pack-{cfg.fingerprint()}"
        t0 = time.perf_counter()
        if not (pack_dir / "index.json").exists():
            pack(str(train_dir), str(pack_dir), cfg, workers=2)
        t_pack = time.perf_counter() - t0
        tcfg = load_train_config(
            None,
            {
                "seed": args.seed,
                "model.preset": "tiny",
                "model.overrides": json.loads(args.model),
                "optim.lr": args.lr,
                "optim.weight_decay": 0.05,
                "schedule.steps": args.steps,
                "schedule.warmup_steps": min(100, args.steps // 10),
                "data.batch_size": args.batch_size,
                "checkpoint.every": 0,
                "device": "cpu",
                "log_every": 100000,
                **{f"mix.{k}": v for k, v in mix.items()},
            },
        )
        tag = hashlib.sha256(f"{args.model} {args.lr} {args.batch_size}".encode()).hexdigest()[:8]
        run = args.out / f"run-{name}-{args.steps}-{args.seed}-{tag}"
        t0 = time.perf_counter()
        if not (run / "summary.json").exists():
            train(
                tcfg,
                open_source(str(pack_dir), batch_size=args.batch_size, seed=args.seed),
                run,
                verbose=False,
            )
        t_train = time.perf_counter() - t0
        net, meta = load_model(run, torch.device("cpu"))
        res = {}
        for split, folder in (("heldout", test_dir), ("train", train_dir)):
            r = evaluate_folder(
                net,
                folder,
                [None],
                patch=4,
                seq_len=256,
                device=torch.device("cpu"),
                class_names=meta["class_names"],
            )
            res[split] = r[0].top1
        row = {
            "variant": name,
            "augment": {k: list(v) if isinstance(v, tuple) else v for k, v in aug.items()},
            "mix": mix,
            "heldout_top1": round(res["heldout"], 4),
            "train_top1": round(res["train"], 4),
            "pack_s": round(t_pack, 1),
            "train_s": round(t_train, 1),
        }
        results.append(row)
        print(
            f"{name:>14}  held-out top-1 {row['heldout_top1']:.3f}  train top-1 {row['train_top1']:.3f}  "
            f"(pack {t_pack:.0f} s, train {t_train:.0f} s)",
            flush=True,
        )
    summary = {
        "commit": commit.stdout.strip(),
        "train_images": args.train,
        "test_images": args.test,
        "steps": args.steps,
        "images_per_step": "about 5 per row x batch_size rows",
        "seed": args.seed,
        "model_overrides": json.loads(args.model),
        "lr": args.lr,
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
