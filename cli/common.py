"""Flags shared by `navit plan`, `navit pack`, `navit serve` and live `navit train`, and the code
that turns them into a PackConfig (config file first, then flags on top)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from packer.config import PackConfig, load_pack_config, parse_crop, parse_resolution, parse_token_drop

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/)", show_default=False)
]
SeqLenOpt = Annotated[
    int | None, typer.Option("--seq-len", help="tokens per packed sequence", show_default=False)
]
PatchOpt = Annotated[
    int | None, typer.Option("--patch-size", help="patch side in pixels", show_default=False)
]
MaxImagesOpt = Annotated[
    int | None, typer.Option("--max-images-per-seq", help="cap on images per sequence", show_default=False)
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-tokens-per-image", help="cap on an image's tokens (default seq_len)", show_default=False
    ),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="global seed", show_default=False)]
ResolutionOpt = Annotated[
    str | None,
    typer.Option(
        "--resolution",
        help="native[:MAXSIDE] | uniform:LO:HI | truncnormal:MEAN:STD:LO:HI",
        show_default=False,
    ),
]
TokenDropOpt = Annotated[
    str | None,
    typer.Option(
        "--token-drop",
        help="none | constant:RATE | beta:MEAN:MAX | resolution:MIN:MAX[:JITTER]",
        show_default=False,
    ),
]
CropOpt = Annotated[
    str | None,
    typer.Option(
        "--crop",
        help="pack-time random-resized crop: off | SCALE_LO:SCALE_HI[:RATIO_LO:RATIO_HI] (area fraction; "
        "aspect ratio as a multiple of the image's, default 0.75:1.333)",
        show_default=False,
    ),
]
HflipOpt = Annotated[
    float | None,
    typer.Option("--hflip", help="pack-time horizontal flip probability (0..1)", show_default=False),
]
PackerOpt = Annotated[
    str | None,
    typer.Option("--packer", help="next-fit | first-fit | bfd | histogram | stream", show_default=False),
]
ExactFillOpt = Annotated[
    bool | None,
    typer.Option(
        "--exact-fill/--no-exact-fill", help="close sequence gaps with dropped tokens", show_default=False
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="any config field, dotted: --set resolution.side=area", show_default=False),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Ray CPUs to use (default: all)", show_default=False)
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="HOST:PORT or auto: join a running Ray cluster (auth token from ~/.ray/auth_token, "
        "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN); default: embedded local Ray",
        show_default=False,
    ),
]


def _parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` items → {dotted key: YAML value}, in order. Every value given applies
    (``null`` too: back to the default); a malformed item is refused, never skipped."""
    from packer.config import parse_yaml_value
    from packer.configfile import check_dotted_key
    from packer.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. packing.seq_len=512")
        key, value = item.split("=", 1)
        key = key.strip()
        check_dotted_key(key, f"--set '{item[:60]}'")
        out[key] = parse_yaml_value(value, f"--set {key}")
    return out


PACK_FLAG_NAMES = (
    "seq_len",
    "patch_size",
    "max_images_per_seq",
    "max_tokens_per_image",
    "seed",
    "resolution",
    "token_drop",
    "packer",
    "exact_fill",
    "crop",
    "hflip",
    "sets",
)


def pack_flags(values: dict[str, Any]) -> dict[str, Any]:
    """The shared packing flags out of a command's parameters (pass ``locals()``), so each command
    forwards them to :func:`pack_config_from_flags` without repeating the list."""
    return {name: values[name] for name in PACK_FLAG_NAMES if name in values}


def pack_config_from_flags(
    config: Path | None = None,
    *,
    seq_len: int | None = None,
    patch_size: int | None = None,
    max_images_per_seq: int | None = None,
    max_tokens_per_image: int | None = None,
    seed: int | None = None,
    resolution: str | None = None,
    token_drop: str | None = None,
    packer: str | None = None,
    exact_fill: bool | None = None,
    crop: str | None = None,
    hflip: float | None = None,
    sets: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> PackConfig:
    """Config file, then --set, then the named flags (None = not given, never overrides): the
    named flags win. ``extra``: more named flags as {dotted key: value or None}."""
    flags: dict[str, Any] = {
        "seed": seed,
        "packing.seq_len": seq_len,
        "packing.patch_size": patch_size,
        "packing.max_images_per_seq": max_images_per_seq,
        "packing.max_tokens_per_image": max_tokens_per_image,
        "packing.packer": packer,
        "packing.exact_fill": exact_fill,
        "augment.hflip": hflip,
        **(extra or {}),
    }
    if crop is not None:
        flags["augment"] = parse_crop(crop)
    if resolution is not None:
        flags["resolution"] = parse_resolution(resolution)
    if token_drop is not None:
        flags["token_drop"] = parse_token_drop(token_drop)
    return load_pack_config(config, flags, sets=_parse_set(sets))
