"""`navit synth`: write a deterministic synthetic labeled ImageFolder (for tests and the demo)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from packer.errors import NavitError


def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (ImageFolder layout)")],
    n: Annotated[int, typer.Option("--n", help="number of images")] = 600,
    seed: Annotated[int, typer.Option("--seed", help="seed: same seed and n give byte-identical files")] = 0,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="shapes: 6 shape/texture classes, 48-1024 px | aspect: dark ellipse or rectangle whose "
            "class is its kind and its own aspect ratio (tall/round/wide), 64-256 px (make demo)",
        ),
    ] = "shapes",
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="folder: ImageFolder | wds: WebDataset tar shards (image + .cls) | parquet: Parquet files "
            "with image struct{bytes, path} and label (the same images, keys and labels in each)",
        ),
    ] = "folder",
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="wds/parquet: images per .tar shard / .parquet file", min=1)
    ] = 1000,
) -> None:
    """Generate N labeled images (JPEG/PNG; RGB/L/RGBA/P; some EXIF-rotated) of one task."""
    from packer.synth import TASKS, generate
    from packer.synth_formats import FORMATS, generate_as

    if n < 0:
        raise NavitError(f"--n must be >= 0 (got {n})")
    if seed < 0:
        raise NavitError(f"--seed must be >= 0 (got {seed})")
    if task not in TASKS:
        raise NavitError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if fmt not in FORMATS:
        raise NavitError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if out.exists() and not out.is_dir():
        raise NavitError(f"--out {out}: exists and is not a directory")
    t0 = time.perf_counter()
    try:
        if fmt == "folder":
            written = generate(out, n=n, seed=seed, task=task)
        else:
            written = generate_as(out, fmt, n=n, seed=seed, task=task, shard_size=shard_size)
    except OSError as e:
        raise NavitError(f"cannot write to {out}: {e.strerror or e}") from None
    dt = time.perf_counter() - t0
    rate = len(written) / dt if dt > 0 else float("inf")
    typer.echo(
        f"wrote {len(written)} images ({fmt}) in {len(TASKS[task])} classes ({', '.join(TASKS[task])}) "
        f"to {out} in {dt:.1f}s ({rate:.0f} images/s)"
    )


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
