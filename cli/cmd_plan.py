"""`navit plan`: scan headers, sample sizes and drops, pack, and report — no pixel decoded."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from cli.common import (
    ConfigOpt,
    CropOpt,
    ExactFillOpt,
    HflipOpt,
    MaxImagesOpt,
    MaxTokensOpt,
    PackerOpt,
    PatchOpt,
    RayAddressOpt,
    ResolutionOpt,
    SeedOpt,
    SetOpt,
    TokenDropOpt,
    WorkersOpt,
    pack_config_from_flags,
    pack_flags,
)
from cli.source_flags import ImageColumnOpt, LabelColumnOpt, LabelFieldOpt, source_overrides
from packer.errors import ConfigError

SeqLensOpt = Annotated[
    str | None,
    typer.Option(
        "--seq-len",
        help="tokens per packed sequence; a comma list (256,512,1024) reports each",
        show_default=False,
    ),
]


def parse_seq_lens(spec: str | None) -> list[int | None]:
    """'256,512' → [256, 512]; None → [None] (the config's seq_len)."""
    if spec is None:
        return [None]
    out: list[int | None] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ConfigError(f"--seq-len '{spec}': '{part}' is not a whole number") from None
        if value < 1:
            raise ConfigError(f"--seq-len '{spec}': must be >= 1 (got {value})")
        if value not in out:
            out.append(value)
    return out


def plan(
    source: Annotated[
        str,
        typer.Argument(
            help="image folder, manifest (.csv/.jsonl/.parquet), or a URI (s3://, gs://, file://)"
        ),
    ],
    config: ConfigOpt = None,
    seq_len: SeqLensOpt = None,
    patch_size: PatchOpt = None,
    max_images_per_seq: MaxImagesOpt = None,
    max_tokens_per_image: MaxTokensOpt = None,
    seed: SeedOpt = None,
    resolution: ResolutionOpt = None,
    token_drop: TokenDropOpt = None,
    packer: PackerOpt = None,
    exact_fill: ExactFillOpt = None,
    crop: CropOpt = None,
    hflip: HflipOpt = None,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    sets: SetOpt = None,
    label_field: LabelFieldOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    epoch: Annotated[int, typer.Option("--epoch", help="epoch whose draws to plan", min=0)] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per seq_len (a list when several)")
    ] = False,
) -> None:
    """Plan how SOURCE packs into fixed-length sequences and report padding, the lower bound and the
    distributions. Headers are scanned once; each --seq-len is then planned and reported."""
    from packer.analysis.report import plan_report, render_table, render_text
    from packer.plan.planner import make_plan, scan_source

    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be >= 1 (got {workers})")
    flags = pack_flags(locals())
    extra = source_overrides(label_field, image_column, label_column)
    cfgs = [
        pack_config_from_flags(config, **{**flags, "seq_len": n}, extra=extra)
        for n in parse_seq_lens(seq_len)
    ]
    t0 = time.perf_counter()
    scan = scan_source(source, cfgs[0], ray_address=ray_address, workers=workers)
    scan_s = time.perf_counter() - t0
    reports = []
    for cfg in cfgs:
        t1 = time.perf_counter()
        p = make_plan(scan, cfg, epoch)
        rep = plan_report(p, cfg, skipped=scan.listing.skipped, algorithm_seconds=time.perf_counter() - t1)
        rep["source"] = source
        rep["scan_seconds"] = scan_s
        reports.append(rep)
    if as_json:
        typer.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return
    for rep in reports:
        typer.echo(render_text(rep))
        typer.echo("")
    if len(reports) > 1:
        typer.echo(render_table(reports))
    typer.echo(
        f"headers scanned in {scan_s:.2f} s; planned in "
        + ", ".join(f"{r['plan_seconds']:.2f} s" for r in reports)
    )


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
