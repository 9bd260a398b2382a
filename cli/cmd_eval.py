"""`navit eval`: top-1 / top-5 of a trained checkpoint on a labeled image folder at several
resolutions (or on a pack directory as packed): a table, JSON, and a plot of accuracy vs resolution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        source: Annotated[
            str,
            typer.Argument(
                help="labeled image folder (ROOT/<class>/...), WebDataset .tar shards or Parquet image "
                "files (a file, a pattern or a folder of them), or pack directory"
            ),
        ],
        checkpoint: Annotated[
            Path, typer.Option("--checkpoint", help="checkpoint directory, or a run directory (newest)")
        ],
        resolutions: Annotated[
            str,
            typer.Option(
                "--resolutions",
                help="longer-side sizes, comma-separated; 'native' allowed; sqN squashes to N x N "
                "(aspect ratio lost, as a plain ViT's resize)",
            ),
        ] = "64,128,224,384,native",
        json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
        plot: Annotated[
            Path | None, typer.Option("--plot", help="write accuracy vs resolution (PNG)", show_default=False)
        ] = None,
        device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
        batch_rows: Annotated[int, typer.Option("--batch-rows", help="packed rows per forward", min=1)] = 8,
        ema: Annotated[
            bool, typer.Option("--ema", help="evaluate the checkpoint's EMA weights (train.ema_decay > 0)")
        ] = False,
        sets: Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                help="model.attention=BACKEND: evaluate with another attention backend",
                show_default=False,
            ),
        ] = None,
    ) -> None:
        """Top-1 / top-5 accuracy of a checkpoint at each resolution (no Ray)."""
        from packer import schema
        from trainer.evaluate import (
            evaluate_folder,
            evaluate_shards,
            format_table,
            load_model,
            parse_resolutions,
            plot_results,
        )
        from trainer.loop import resolve_device

        res = parse_resolutions(resolutions)
        dev = resolve_device(device)
        attention = _attention_from_sets(sets)
        net, meta = load_model(checkpoint, dev, ema=ema, attention=attention)
        if "files" not in meta:  # written before checkpoints carried digests
            typer.echo(f"note: {meta['path']} predates checkpoint digests: loaded unverified", err=True)
        from packer.plan.containers import names_containers

        is_pack = ("://" in source and not names_containers(source)) or (
            Path(source) / schema.INDEX_FILE
        ).is_file()
        if is_pack:
            results = evaluate_shards(net, source, device=dev, batch_rows=batch_rows)
        else:
            results = evaluate_folder(
                net,
                source,
                res,
                patch=int(meta["patch_size"]),
                seq_len=int(meta["seq_len"]),
                device=dev,
                class_names=meta.get("class_names"),
                batch_rows=batch_rows,
            )
        if plot is not None:
            plot_results(results, plot, title=f"{meta['path']} on {source}")
        rejected = results[0].rejected if results else []
        if json_out:
            payload = {
                "checkpoint": meta["path"],
                "step": meta["step"],
                "source": source,
                "images_listed": (results[0].images if results else 0) + len(rejected),
                "images_rejected": len(rejected),
                "results": [r.to_dict() for r in results],
                "rejected": rejected,
            }
            typer.echo(json.dumps(payload, indent=2))
        else:
            typer.echo(f"checkpoint {meta['path']} (step {meta['step']}) on {source}")
            typer.echo(format_table(results))
            if rejected:
                typer.echo(_rejected_lines(rejected, results[0].images + len(rejected)))


# The text report names this many rejected files; --json lists every one.
SHOW_REJECTED = 20


def _rejected_lines(rejected: list[dict[str, str]], listed: int) -> str:
    from trainer.evaluate import rejection_summary

    lines = [f"{len(rejected)} of {listed} files rejected, not evaluated ({rejection_summary(rejected)}):"]
    lines += [f"  {r['path']}: {r['reason']}" for r in rejected[:SHOW_REJECTED]]
    if len(rejected) > SHOW_REJECTED:
        lines.append(f"  ... and {len(rejected) - SHOW_REJECTED} more (--json lists every one)")
    return "\n".join(lines)


def _attention_from_sets(sets: list[str] | None) -> str | None:
    """``--set model.attention=flex`` → "flex"; anything else is refused in one line (the rest of the
    model comes from the checkpoint)."""
    from packer.errors import ConfigError

    attention = None
    for item in sets or []:
        key, sep, value = item.partition("=")
        if key.strip() != "model.attention" or not sep or not value.strip():
            raise ConfigError(f"--set {item}: navit eval accepts only model.attention=BACKEND")
        attention = value.strip()
    return attention
