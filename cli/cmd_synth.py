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
) -> None:
    """Generate N labeled images (shapes and textures; JPEG/PNG; RGB/L/RGBA/P; some EXIF-rotated)."""
    from packer.synth import CLASSES, generate

    if n < 0:
        raise NavitError(f"--n must be >= 0 (got {n})")
    if seed < 0:
        raise NavitError(f"--seed must be >= 0 (got {seed})")
    if out.exists() and not out.is_dir():
        raise NavitError(f"--out {out}: exists and is not a directory")
    t0 = time.perf_counter()
    try:
        written = generate(out, n=n, seed=seed)
    except OSError as e:
        raise NavitError(f"cannot write to {out}: {e.strerror or e}") from None
    dt = time.perf_counter() - t0
    rate = len(written) / dt if dt > 0 else float("inf")
    typer.echo(
        f"wrote {len(written)} images in {len(CLASSES)} classes ({', '.join(CLASSES)}) to {out} "
        f"in {dt:.1f}s ({rate:.0f} images/s)"
    )


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
