"""`navit stats`: packing efficiency and padding statistics of one or several pack directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from packer.errors import NavitError


def stats(
    dirs: Annotated[list[str], typer.Argument(help="pack directories (local paths or s3:// / gs:// URIs)")],
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print the report as JSON: one object, or {dir: report} for several"),
    ] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="write a multi-panel PNG of the distributions here")
    ] = None,
    no_verify: Annotated[
        bool,
        typer.Option("--no-verify", help="skip the sha256 check of every shard (it reads every byte)"),
    ] = False,
) -> None:
    """Sequences, tokens, padding, lower bound, per-image distributions, labels, rejections and a
    cross-check of index.json against the shards, from metadata, plus every shard's sha256
    (--no-verify skips it). Exits 1 with a WARNING when something disagrees or is corrupt."""
    from packer.analysis.load import load_pack
    from packer.analysis.render import render_comparison, render_text
    from packer.analysis.stats import build_report

    if not dirs:
        raise NavitError("give at least one pack directory")
    if len(set(dirs)) != len(dirs):
        raise NavitError("a directory is given twice")
    if plot is not None and plot.suffix.lower() != ".png":
        raise NavitError(f"--plot {plot}: expected a .png file name")
    packs = [load_pack(d, verify=not no_verify) for d in dirs]
    reports = [build_report(p) for p in packs]
    if as_json:
        obj = reports[0] if len(reports) == 1 else {r["dir"]: r for r in reports}
        typer.echo(json.dumps(obj, indent=2))
    elif len(reports) == 1:
        typer.echo(render_text(reports[0]))
    else:
        typer.echo(render_comparison(reports))
    if plot is not None:
        from packer.analysis.plots import plot_stats

        try:
            plot_stats(packs, reports, plot)
        except OSError as e:
            raise NavitError(f"cannot write --plot {plot}: {e.strerror or e}") from None
        typer.echo(f"wrote {plot}", err=as_json)
    bad = [r for r in reports if not r["consistency"]["ok"]]
    for r in bad:
        # On stderr too, so a --json consumer or a script sees it without parsing the report.
        problems = r["consistency"]["problems"]
        more = f" (and {len(problems) - 1} more, see 'consistency')" if len(problems) > 1 else ""
        typer.secho(f"WARNING: {r['dir']}: {problems[0]}{more}", fg=typer.colors.YELLOW, err=True)
    if bad:
        sys.exit(1)


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)
