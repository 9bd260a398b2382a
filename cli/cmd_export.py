"""`navit export`: a run's model as ``model.safetensors`` + ``config.json`` (model/pretrained.py),
loadable with ``NaViT.from_pretrained(DIR)`` (plain torch + safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        run: Annotated[
            str,
            typer.Argument(
                help="run folder (newest checkpoint), checkpoint folder, or a timm ViT state dict to convert"
            ),
        ],
        out: Annotated[
            Path, typer.Option("--out", "-o", help="export folder (created; an export is replaced)")
        ],
        heads: Annotated[
            int | None,
            typer.Option("--heads", help="timm only: attention heads, if not the ViT family's", min=1),
        ] = None,
    ) -> None:
        """Write the model of RUN as model.safetensors + config.json (+ class names) for
        NaViT.from_pretrained and other tools; a timm ViT state dict is converted on the way."""
        from model.pretrained import PretrainedError, save_pretrained
        from packer.errors import NavitError
        from trainer.init_from import read_init_source

        src = read_init_source(run, {"heads": heads} if heads else None, what="navit export")
        try:
            dest = save_pretrained(
                out,
                src.weights,
                src.model_config,
                class_names=src.class_names,
                seq_len=src.seq_len,
                source={**src.record(), **({"notes": src.notes} if src.notes else {})},
            )
        except PretrainedError as e:
            raise NavitError(str(e)) from None
        for note in src.notes:
            typer.echo(f"note: {note}", err=True)
        mc = src.model_config
        typer.echo(
            f"navit export: {dest} ({src.kind} {src.path}): dim {mc['dim']}, depth {mc['depth']}, patch "
            f"{mc['patch_size']}, {mc.get('num_classes', 0)} classes"
            + (
                f" ({', '.join(src.class_names[:6])}{', ...' if len(src.class_names) > 6 else ''})"
                if src.class_names
                else ""
            )
        )
