"""Flags naming what to read in WebDataset / Parquet sources (`navit plan`, `navit pack`); other
commands take the same settings as ``--set source.label_field=...`` or from the config file."""

from __future__ import annotations

from typing import Annotated, Any

import typer

LabelFieldOpt = Annotated[
    str | None,
    typer.Option(
        "--label-field",
        help="WebDataset: field of each sample's .json holding its label (default label)",
        show_default=False,
    ),
]
ImageColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--image-column",
        help="Parquet: image column, binary or struct{bytes, path} (default image)",
        show_default=False,
    ),
]
LabelColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--label-column",
        help="Parquet: label column, integer or class names (default label)",
        show_default=False,
    ),
]


def source_overrides(
    label_field: str | None, image_column: str | None, label_column: str | None
) -> dict[str, Any]:
    """Config overrides for the flags that were given (flags win over --set and the config file)."""
    given = {
        "source.label_field": label_field,
        "source.image_column": image_column,
        "source.label_column": label_column,
    }
    return {k: v for k, v in given.items() if v is not None}
