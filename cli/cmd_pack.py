"""`navit pack`: plan, then decode/pack/write verifiable shards with Ray Data (see packer.build.pipeline)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

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
    SeqLenOpt,
    SetOpt,
    TokenDropOpt,
    WorkersOpt,
    pack_config_from_flags,
    pack_flags,
)
from cli.source_flags import ImageColumnOpt, LabelColumnOpt, LabelFieldOpt, source_overrides
from packer.errors import NavitError, Terminated


class _Reporter:
    """Progress of a pack: a rich bar on a terminal, one log line per shard (at most every 2 s)
    otherwise. Counts images handled (packed + rejected) in shards built by this run."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.t0 = time.perf_counter()
        self.images = 0
        self.shards_done = 0
        self.shards_total = 0
        self.images_total = 0
        self._last_log = 0.0
        self._bar: Any = None
        self._task: Any = None

    # packer.build.pipeline.Progress protocol -------------------------------------------------------------
    def epoch_planned(self, epoch: int, epochs: int, plan: Any, n_shards: int, reused: int) -> None:
        if epoch == 0:
            self.t0 = time.perf_counter()  # rates and ETA count from the first shard task, not planning
        self.shards_total += n_shards
        self.images_total += len(plan.image_id)
        msg = (
            f"epoch {epoch + 1}/{epochs}: {len(plan.image_id)} images planned, {len(plan.rejected)} rejected "
            f"at plan, {plan.num_sequences} sequences in {n_shards} shards"
            + (f" ({reused} already on disk and verified)" if reused else "")
        )
        if self.tty:
            self._ensure_bar()
            self._bar.console.print(msg)
            self._bar.update(self._task, total=self.images_total)
        else:
            typer.echo(f"[pack] {msg}", err=True)

    def shard_done(self, meta: dict[str, Any], reused: bool) -> None:
        n = int(meta["images"]) + len(meta["rejections"])
        self.shards_done += 1
        if not reused:
            self.images += n
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.images / dt
        if self.tty:
            self._bar.update(
                self._task,
                advance=n,
                rate=f"{rate:,.0f} img/s",
                shards=f"{self.shards_done}/{self.shards_total} shards",
            )
            return
        now = time.perf_counter()
        if now - self._last_log >= 2.0 or self.shards_done == self.shards_total:
            self._last_log = now
            done = self.shards_done
            left = self.shards_total - done
            eta = left * dt / max(done, 1)
            typer.echo(
                f"[pack] shards {done}/{self.shards_total}  {rate:,.0f} images/s  ETA {eta:,.0f}s", err=True
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _ensure_bar(self) -> None:
        if self._bar is not None:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]pack"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images  {task.fields[rate]}  {task.fields[shards]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._bar.add_task("pack", total=None, rate="", shards="")
        self._bar.start()


def render_summary(result: Any, out: str) -> str:
    """The one-screen summary printed at the end of `navit pack`."""
    idx = result.index
    t = idx["totals"]
    lines = [
        f"navit pack: {out}  ({result.seconds:.1f}s)",
        f"  config      seq_len {idx['seq_len']}, patch {idx['patch_size']}, "
        f"max {idx['max_images_per_seq']} images/seq, seed {idx['seed']}, epochs {idx['epochs']}, "
        f"fingerprint {idx['fingerprint']}",
        f"  shards      {len(idx['shards'])} ({result.shards_built} built, {result.shards_reused} verified "
        f"and kept), {idx['shard_rows']} rows each",
        f"  images      {t['images_in']} in = {t['images_packed']} packed + {t['images_rejected']} rejected "
        f"({t['images_rejected_at_plan']} at plan, {t['images_rejected_at_pack']} at pack)",
    ]
    if t.get("folders_unreadable"):
        n = int(idx["per_epoch"][0]["folders_unreadable"])  # the totals count it once per epoch
        lines.append(
            f"  listing     {n} folder{'s' if n != 1 else ''} could not be listed: their images are not "
            "in this pack (each counted as one rejected input; see rejected.jsonl)"
        )
    lines += [
        f"  sequences   {t['sequences']} (lower bound {t['lower_bound_sequences']}, "
        f"+{100 * t['excess_over_lower_bound']:.2f}%)",
        f"  tokens      {t['real_tokens']} real, {t['padding_tokens']} padding "
        f"({100 * t['padding_fraction']:.2f}%)",
    ]
    if result.exec_seconds > 0 and result.shards_built:
        lines.append(
            f"  throughput  {result.images_built / result.exec_seconds:,.0f} images/s building shards "
            f"({result.exec_seconds:.1f}s); start-up, planning and final files "
            f"{result.seconds - result.exec_seconds:.1f}s"
        )
    if result.shards_by_node:
        # Ray node ids (first 12 hex digits, as `ray list nodes` shows them in full): on a cluster this
        # says whether every machine took part.
        per_node = sorted(result.shards_by_node.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(
            f"  ray nodes   {len(per_node)} built shards: "
            + ", ".join(f"{node[:12]} {n}" for node, n in per_node)
        )
    if result.rejected_by_reason:
        lines.append("  rejected by reason:")
        top = sorted(result.rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
        for reason, n in top[:8]:
            lines.append(f"    {n:6d}  {reason}")
        if len(top) > 8:
            lines.append(f"    ... and {len(top) - 8} more reasons (see rejected.jsonl)")
    return "\n".join(lines)


def pack(
    source: Annotated[
        str, typer.Argument(help="image folder, manifest (csv/jsonl/parquet) or s3:// / gs:// URI")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="output pack directory (local path or URI)")],
    config: ConfigOpt = None,
    seq_len: SeqLenOpt = None,
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
    sets: SetOpt = None,
    label_field: LabelFieldOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    shard_rows: Annotated[
        int | None,
        typer.Option(
            "--shard-rows", help="sequences per shard (default: ~128 MB of patches)", show_default=False
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", help="independent plans (fresh draws) written in turn", show_default=False),
    ] = None,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="verify shards already in --out by checksum; rebuild the rest")
    ] = False,
) -> None:
    """Decode, resize, patchify and pack SOURCE into fixed-length sequences, written as verifiable
    Parquet shards plus index.json, images.parquet and rejected.jsonl (see docs/pack.md)."""
    from packer.build.pipeline import pack as run_pack

    if workers is not None and workers < 1:
        raise NavitError(f"--workers must be >= 1 (got {workers})")
    cfg = pack_config_from_flags(
        config,
        **pack_flags(locals()),
        extra={
            "output.shard_rows": shard_rows,
            "output.epochs": epochs,
            **source_overrides(label_field, image_column, label_column),
        },
    )
    typer.echo(f"[pack] planning {source}: starting Ray, listing files, reading headers ...", err=True)
    reporter = _Reporter(tty=sys.stderr.isatty())
    try:
        result = run_pack(
            source, out, cfg, workers=workers, ray_address=ray_address, resume=resume, progress=reporter
        )
    except (KeyboardInterrupt, Terminated) as e:  # Ctrl-C or SIGTERM: one line that says what is kept
        kept = "the shards already written are kept; run the same command with --resume to finish"
        if isinstance(e, Terminated):
            raise Terminated(kept) from None  # cli.main prints it, exit code 143
        typer.echo(f"interrupted: {kept}", err=True)  # typer then exits with 130
        raise
    finally:
        reporter.close()
    typer.echo(render_summary(result, out))


def register(app: typer.Typer) -> None:
    app.command("pack")(pack)
