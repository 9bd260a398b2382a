"""`navit embed`: embeddings and top-k predictions of every image of a source (trainer/embed.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from packer.errors import NavitError


def parse_embed_resolution(spec: str) -> int | None:
    """'native' → None (each image's own size, capped at seq_len tokens); 'N' → longer side N px."""
    s = spec.strip().lower()
    if s == "native":
        return None
    if s.isdigit() and int(s) > 0:
        return int(s)
    raise NavitError(f"--resolution: {spec!r} is not 'native' or a positive number of pixels")


class _Progress:
    """A rich bar on a terminal; otherwise a log line at most every 2 s (as `navit pack`)."""

    def __init__(self, tty: bool) -> None:
        self.tty, self._bar, self._task, self._last = tty, None, None, 0.0

    def listed(self, n: int) -> None:
        if not self.tty:
            typer.echo(f"[embed] {n} images listed", err=True)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]embed"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images  {task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("embed", total=n, rate="")
        self._bar.start()

    def update(self, done: int, total: int, s: Any) -> None:
        rate = f"{s.images_per_s:,.1f} img/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=rate)
            return
        now = time.perf_counter()
        if now - self._last >= 2.0 or done == total:
            self._last = now
            typer.echo(f"[embed] {done}/{total} images  {rate}  {s.rejected} rejected", err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed(
        checkpoint: Annotated[
            str,
            typer.Argument(help="navit export folder, checkpoint or run folder, or a timm ViT state dict"),
        ],
        source: Annotated[
            str, typer.Argument(help="image folder, manifest (csv/jsonl/parquet) or s3:// / gs:// URI")
        ],
        out: Annotated[Path, typer.Option("--out", "-o", help="output Parquet file")],
        resolution: Annotated[
            str, typer.Option("--resolution", help="native | N (longer side N px, aspect ratio kept)")
        ] = "native",
        seq_len: Annotated[
            int | None,
            typer.Option(
                "--seq-len",
                help="row length and per-image token cap (default: the training seq_len)",
                min=1,
                show_default=False,
            ),
        ] = None,
        batch_tokens: Annotated[
            int, typer.Option("--batch-tokens", help="tokens per forward pass (rows x seq_len)", min=1)
        ] = 8192,
        dtype: Annotated[
            str, typer.Option("--dtype", help="embedding storage: float32 | float16")
        ] = "float32",
        topk: Annotated[int, typer.Option("--topk", help="predictions kept per image (0 = none)", min=0)] = 5,
        device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
        workers: Annotated[
            int | None, typer.Option("--workers", help="decode threads (default: min(4, CPUs))", min=1)
        ] = None,
    ) -> None:
        """Pooled embeddings, top-k predictions, size used and token count of every image of SOURCE,
        packed into rows like training; unreadable images are listed with a reason (no Ray)."""
        from trainer.embed import embed_source, load_any_model
        from trainer.loop import resolve_device

        res = parse_embed_resolution(resolution)
        if dtype not in ("float32", "float16"):
            raise NavitError(f"--dtype: {dtype!r} is not float32 or float16")
        from packer.plan.sources import check_source

        check_source(source)
        dev = resolve_device(device)
        loaded = load_any_model(checkpoint, dev)
        rows = seq_len or loaded.seq_len or 1024
        reporter = _Progress(sys.stderr.isatty())
        try:
            s = embed_source(
                loaded,
                source,
                out,
                resolution=res,
                seq_len=rows,
                batch_tokens=batch_tokens,
                device=dev,
                dtype=dtype,
                topk=topk,
                workers=workers or min(4, os.cpu_count() or 1),
                progress=reporter.update,
                on_listed=reporter.listed,
            )
        finally:
            reporter.close()
        cfg = loaded.net.cfg
        pad = 1 - s.real_tokens / s.row_tokens if s.row_tokens else 0.0
        desc = loaded.description
        where = desc.get("checkpoint") or desc.get("export") or desc.get("path")
        lines = [
            f"navit embed: {out}  ({s.seconds:.1f}s)",
            f"  model       {where}: dim {cfg.dim}, patch {cfg.patch_size}, "
            f"{cfg.num_classes or 'no'} classes; resolution {resolution}, rows of {rows} tokens",
            f"  images      {s.images_in} in = {s.embedded} embedded + {s.rejected} rejected"
            + (f"; {s.skipped_files} non-image files skipped" if s.skipped_files else ""),
            f"  tokens      {s.real_tokens} real ({s.real_tokens / max(s.embedded, 1):.1f}/image), "
            f"{pad:.1%} padding",
            f"  throughput  {s.images_per_s:,.1f} images/s (list + decode + forward, {dev.type})",
        ]
        if s.rejected_by_reason:
            lines.append("  rejected by reason:")
            for reason, c in sorted(s.rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:8]:
                lines.append(f"    {c:6d}  {reason}")
        typer.echo("\n".join(lines))
