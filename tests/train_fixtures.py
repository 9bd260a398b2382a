"""Test helpers for the trainer: tiny labeled images and shard sets written without Ray.

Images are drawn shapes whose class is their content (the size is independent of the label), packed
next-fit into rows with trainer.evaluate.pack_rows and written with packer.schema exactly as
`navit pack` lays out a pack directory (index.json last)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from packer import schema
from trainer.evaluate import pack_rows

# Sorted names, so ImageFolder label order (sorted folder names) equals these indices.
CLASSES = ("a_square", "b_cross", "c_hstripes", "d_vstripes")


def shape_image(label: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8: a noisy background with a class-specific pattern in a random colour."""
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    col = rng.integers(150, 256, size=3, dtype=np.uint8)
    if label == 0:  # centred filled square
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = col
    elif label == 1:  # cross
        img[h // 2 - max(1, h // 10) : h // 2 + max(1, h // 10)] = col
        img[:, w // 2 - max(1, w // 10) : w // 2 + max(1, w // 10)] = col
    elif label == 2:  # horizontal stripes
        for y in range(0, h, 8):
            img[y : y + 4] = col
    else:  # vertical stripes
        for x in range(0, w, 8):
            img[:, x : x + 4] = col
    return img


def make_images(n: int, seed: int, patch: int = 8, sides: tuple[int, ...] = (16, 24, 32)) -> tuple:
    """n images (sides multiples of ``patch``) with balanced labels; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % len(CLASSES)
        h, w = (int(rng.choice(sides)) for _ in range(2))
        images.append(shape_image(label, h, w, rng))
        labels.append(label)
    return images, labels


def write_pack(
    out: str | Path,
    images: list[np.ndarray],
    labels: list[int],
    *,
    patch: int = 8,
    seq_len: int = 64,
    shard_rows: int = 8,
    epochs: int = 1,
    row_group_rows: int = 4,
) -> Path:
    """Write a pack directory; epoch e packs the images in a seeded order so epochs differ."""
    out = Path(out)
    (out / schema.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    totals = {k: 0 for k in schema.TOTALS_KEYS}
    for epoch in range(epochs):
        order = np.random.default_rng([7, epoch]).permutation(len(images))
        rows = pack_rows([images[i] for i in order], [labels[i] for i in order], patch, seq_len)
        for start in range(0, len(rows.patches), shard_rows):
            sl = slice(start, start + shard_rows)
            part = schema.PackedRows(
                rows.patches[sl],
                rows.segment_ids[sl],
                rows.pos_h[sl],
                rows.pos_w[sl],
                rows.image_ids[sl],
                rows.labels[sl],
                rows.grid_h[sl],
                rows.grid_w[sl],
                rows.tokens_full[sl],
            )
            data = schema.table_to_parquet_bytes(schema.rows_to_table(part, seq_len, patch), row_group_rows)
            name = schema.shard_file_name(len(entries))
            schema.atomic_write_bytes(*schema.resolve_fs(str(out / name)), data)
            n = len(part.patches)
            real = int(np.count_nonzero(part.segment_ids))
            entries.append(
                {
                    "file": name,
                    "rows": n,
                    "images": int(sum(len(x) for x in part.labels)),
                    "real_tokens": real,
                    "sha256": schema.sha256_bytes(data),
                    "epoch": epoch,
                }
            )
            totals["sequences"] += n
            totals["real_tokens"] += real
            totals["padding_tokens"] += n * seq_len - real
    totals["images_in"] = totals["images_packed"] = len(images) * epochs
    totals["padding_fraction"] = totals["padding_tokens"] / max(1, totals["sequences"] * seq_len)
    index = {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "seq_len": seq_len,
        "patch_size": patch,
        "channels": 3,
        "max_images_per_seq": seq_len,
        "config": {"test": True},
        "seed": 0,
        "epochs": epochs,
        "shards": entries,
        "totals": totals,
    }
    schema.atomic_write_bytes(*schema.resolve_fs(str(out / schema.INDEX_FILE)), schema.dumps_index(index))
    return out


def write_image_folder(out: str | Path, images: list[np.ndarray], labels: list[int]) -> Path:
    """An ImageFolder (OUT/<class>/img_N.png) of the given images."""
    from PIL import Image

    out = Path(out)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        d = out / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:04d}.png")
    return out


def tiny_train_config(**overrides):
    """A TrainConfig for tests: tiny preset cut to depth 2, width 64; few steps; quiet."""
    from trainer.config import load_train_config

    base = {
        "model.preset": "tiny",
        "model.overrides": {"depth": 2, "dim": 64, "heads": 2},
        "schedule.steps": 12,
        "schedule.warmup_steps": 2,
        "data.batch_size": 4,
        "data.shuffle_buffer": 16,
        "optim.lr": 3e-3,
        "checkpoint.every": 0,
        "device": "cpu",
        "log_every": 1000,
    }
    base.update(overrides)
    return load_train_config(None, base)


def trained_run(tmp_path_factory, steps: int = 200) -> dict:
    """Train the tiny model once per test session (shared by test_train and test_eval): returns
    {"pack", "run", "result", "val_images", "val_labels"}."""
    from trainer.data import open_source
    from trainer.loop import train

    base = tmp_path_factory.getbasetemp() / "trained_tiny"
    cache = getattr(tmp_path_factory, "_navit_trained", None)
    if cache is not None:
        return cache
    images, labels = make_images(240, seed=11)
    pack = write_pack(base / "pack", images, labels, seq_len=64, shard_rows=16)
    cfg = tiny_train_config(**{"schedule.steps": steps, "schedule.warmup_steps": 20})
    result = train(
        cfg, lambda info: open_source(str(pack), batch_size=4, seed=0), base / "run", verbose=False
    )
    val_images, val_labels = make_images(80, seed=12)
    cache = {
        "pack": pack,
        "run": base / "run",
        "result": result,
        "val_images": val_images,
        "val_labels": val_labels,
    }
    tmp_path_factory._navit_trained = cache
    return cache


def run_cli(argv: list[str], capsys) -> tuple[int | str | None, object]:
    """Run ``navit ARGV`` in-process: (exit code, captured stdout/stderr)."""
    import sys

    from cli.main import main

    old = sys.argv
    sys.argv = ["navit", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr()


def run_cli_plain(argv: list[str]) -> tuple[int | str | None, str]:
    """``navit ARGV`` in-process without pytest's capsys (e.g. in a module-scoped fixture):
    (exit code, what it wrote to stderr)."""
    import contextlib
    import io
    import sys

    from cli.main import main

    err = io.StringIO()
    old = sys.argv
    sys.argv = ["navit", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, err.getvalue()
