"""`navit inspect`: show one packed row — its images rebuilt from their patches, and its layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from packer.errors import NavitError


def inspect(
    data_dir: Annotated[str, typer.Argument(help="pack directory (local path or s3:// / gs:// URI)")],
    row: Annotated[
        int, typer.Option("--row", help="row number, global across shards in index.json order (0-based)")
    ],
    shard: Annotated[
        int | None, typer.Option("--shard", help="count --row within this shard (0-based) instead")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="write a PNG of the row's images and segment layout")
    ] = None,
) -> None:
    """Rebuild the images of packed row N from their patches (dropped tokens in magenta) with label,
    grid and kept/full tokens, above the row's segment layout. Without --out, print a summary."""
    from packer.analysis.row_view import read_row, render_row_png, summarize_row

    if out is not None and out.suffix.lower() != ".png":
        raise NavitError(f"--out {out}: expected a .png file name")
    view = read_row(data_dir, row, shard)
    typer.echo(summarize_row(view))
    if out is not None:
        try:
            w, h = render_row_png(view, out)
        except OSError as e:
            raise NavitError(f"cannot write --out {out}: {e.strerror or e}") from None
        typer.echo(f"wrote {out} ({w}x{h} px)")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
