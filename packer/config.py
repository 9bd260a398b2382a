"""Configuration for the packing stages: source → resolution → token drop → packing → decode.

One pydantic model per stage, grouped in :class:`PackConfig`. Configs load from YAML files in
``configs/`` and are overridden from the CLI with dotted keys (``packing.seq_len=512``). Every
output (plan report, index.json) records ``PackConfig.model_dump()`` plus the seed, so a pack can be
reproduced from its own index.

Short spec strings are accepted where a user types them on the command line:
``--resolution truncnormal:-0.5:1:64:384`` and ``--token-drop beta:0.25:0.5``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from packer.configfile import (  # noqa: F401  (re-exported: the config API callers know)
    FILE_SECTIONS,
    build_config,
    deep_merge,
    file_section,
    format_validation_error,
    parse_yaml_value,
    read_yaml,
)
from packer.errors import ConfigError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Stage):
    """Where images come from and how they are labelled."""

    labels: Literal["folder", "none"] = Field(
        "folder",
        description="'folder': label = first-level folder name (ImageFolder); 'none': unlabeled (-1). "
        "Manifests use their own 'label' column when present.",
    )
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, description="accepted file extensions (any case)")
    follow_hidden: bool = Field(False, description="include hidden files and folders (names starting '.')")
    format: Literal["auto", "folder", "manifest", "wds", "parquet"] = Field(
        "auto",
        description="source layout. 'auto': *.tar / a brace or glob pattern of them / a folder holding only "
        ".tar files → 'wds' (WebDataset shards); a .parquet file with the image column, or a folder of "
        "only such files → 'parquet' (image bytes); other .csv/.jsonl/.parquet → 'manifest'; else 'folder'",
    )
    label_field: str = Field(
        "label",
        min_length=1,
        description="wds: the field of a sample's .json holding its label (when no .cls)",
    )
    image_column: str = Field(
        "image", min_length=1, description="parquet: the image column (binary, or struct{bytes, path})"
    )
    label_column: str = Field(
        "label", min_length=1, description="parquet: the label column (integer, or string class names)"
    )


class ResolutionConfig(_Stage):
    """Per-image target resolution (NaViT §3.2). Aspect ratio is always preserved."""

    kind: Literal["native", "uniform", "truncnormal"] = Field(
        "truncnormal", description="native size (capped), uniform(lo, hi) or truncnormal(mean, std, lo, hi)"
    )
    lo: int = Field(64, ge=1, le=8192, description="smallest sampled side length, pixels")
    hi: int = Field(384, ge=1, le=8192, description="largest sampled side length, pixels")
    mean: float = Field(-0.5, ge=-10, le=10, description="truncnormal: mean of N(mean, std) on [-1, 1]")
    std: float = Field(1.0, gt=0, le=100, description="truncnormal: std of N(mean, std) on [-1, 1]")
    side: Literal["longest", "area"] = Field(
        "longest",
        description="the sampled length is the longer side ('longest') or the side of an equal-area square",
    )
    native_max_side: int = Field(
        1024, ge=1, le=65536, description="native: longer side capped at this many pixels"
    )
    upsample: bool = Field(
        True, description="allow a sampled size larger than the native image (False caps at native)"
    )

    @model_validator(mode="after")
    def _lo_le_hi(self) -> ResolutionConfig:
        if self.lo > self.hi:
            raise ValueError(f"lo ({self.lo}) must be <= hi ({self.hi})")
        return self


class TokenDropConfig(_Stage):
    """Continuous token dropping (NaViT §3.1). Rates are fractions of an image's tokens."""

    kind: Literal["none", "constant", "beta", "resolution"] = Field(
        "none",
        description="none | constant(rate) | beta(mean, max): d = u*max, u ~ Beta with mean 'mean' | "
        "resolution(min_rate, max_rate, jitter): rate grows linearly with token count",
    )
    rate: float = Field(0.0, ge=0.0, lt=1.0, description="constant: drop rate")
    mean: float = Field(0.25, gt=0.0, lt=1.0, description="beta: mean of u ~ Beta(a, b)")
    max: float = Field(0.5, ge=0.0, lt=1.0, description="beta: d_max, the largest drop rate")
    concentration: float = Field(4.0, gt=0.0, le=1000.0, description="beta: a + b of the Beta distribution")
    min_rate: float = Field(0.0, ge=0.0, lt=1.0, description="resolution: rate at 1 token")
    max_rate: float = Field(0.5, ge=0.0, lt=1.0, description="resolution: rate at max_tokens_per_image")
    jitter: float = Field(0.02, ge=0.0, le=0.5, description="resolution: std of the truncated-normal jitter")

    @model_validator(mode="after")
    def _min_le_max(self) -> TokenDropConfig:
        if self.min_rate > self.max_rate:
            raise ValueError(f"min_rate ({self.min_rate}) must be <= max_rate ({self.max_rate})")
        return self


PackerName = Literal["next-fit", "first-fit", "bfd", "histogram", "stream"]


class PackingConfig(_Stage):
    """How images (of known token lengths) are packed into fixed-length sequences."""

    seq_len: int = Field(1024, ge=1, le=1 << 20, description="tokens per packed sequence")
    patch_size: int = Field(16, ge=1, le=256, description="patch side in pixels")
    max_images_per_seq: int = Field(64, ge=1, le=4096, description="cap on images in one sequence")
    max_tokens_per_image: int | None = Field(
        None, ge=1, description="cap on an image's full token count (default: seq_len); shrinks, never crops"
    )
    packer: PackerName = Field("bfd", description="next-fit | first-fit | bfd | histogram | stream")
    exact_fill: bool = Field(
        False, description="with token dropping, fill each sequence's gap with dropped tokens"
    )
    stream_window: int = Field(4096, ge=1, description="stream: images per window")
    stream_open_bins: int = Field(64, ge=0, description="stream: open sequences carried between windows")
    partition_size: int = Field(
        1_000_000, ge=1, description="images planned together; larger sets are planned per partition"
    )

    @model_validator(mode="after")
    def _check(self) -> PackingConfig:
        if self.max_tokens_per_image is not None and self.max_tokens_per_image > self.seq_len:
            raise ValueError(
                f"max_tokens_per_image ({self.max_tokens_per_image}) must be <= seq_len ({self.seq_len})"
            )
        return self

    @property
    def token_cap(self) -> int:
        return self.max_tokens_per_image or self.seq_len


class DecodeConfig(_Stage):
    """Decoding and pixel handling in `navit pack`."""

    max_pixels: int = Field(
        89_478_485, ge=1, description="decompression-bomb limit: images with more pixels are rejected"
    )
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB colour alpha is composited on")
    jpeg_draft: bool = Field(True, description="decode JPEGs at the smallest DCT scale covering the target")

    @model_validator(mode="after")
    def _bg(self) -> DecodeConfig:
        if any(not 0 <= c <= 255 for c in self.background):
            raise ValueError("background values must be in [0, 255]")
        return self


class AugmentConfig(_Stage):
    """Pack-time augmentation, off by default: random-resized crop and horizontal flip (docs/pack.md).

    Drawn per image from (seed, epoch, key) at plan time, so the crop's size and aspect ratio decide
    the patch grid (resolution sampling then applies to the crop) and shards stay deterministic.
    Each image's crop box and flip are recorded in images.parquet.

    As in timm's NaFlex ``RandomResizedCropToSequence``, the aspect ratio is a multiplier of the
    image's own aspect ratio (a native-aspect model must keep seeing native aspect ratios), drawn
    log-uniformly; the area fraction is uniform. Draws are conditioned on the crop fitting inside the
    image (area fraction <= min(ratio, 1/ratio)), so both ranges always hold, with no fallback."""

    crop_scale: tuple[float, float] = Field(
        (1.0, 1.0),
        description="area of the crop as a fraction of the image, [lo, hi] with 0 < lo <= hi <= 1 "
        "([1, 1] with crop_ratio [1, 1]: no crop)",
    )
    crop_ratio: tuple[float, float] = Field(
        (1.0, 1.0),
        description="crop aspect ratio (w/h) as a multiple of the image's own, [lo, hi], log-uniform",
    )
    hflip: float = Field(0.0, ge=0.0, le=1.0, description="probability of a horizontal flip")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        s_lo, s_hi = self.crop_scale
        r_lo, r_hi = self.crop_ratio
        if not 0.0 < s_lo <= s_hi <= 1.0:
            raise ValueError(f"crop_scale [{s_lo}, {s_hi}]: need 0 < lo <= hi <= 1")
        if not 0.0 < r_lo <= r_hi <= 100.0:
            raise ValueError(f"crop_ratio [{r_lo}, {r_hi}]: need 0 < lo <= hi <= 100")
        # A crop of area fraction s and ratio multiple r fits iff s <= min(r, 1/r): some r in the range
        # must allow the smallest area.
        if r_lo > 1.0 / s_lo or r_hi < s_lo:
            raise ValueError(
                f"crop_ratio [{r_lo}, {r_hi}] with crop_scale [{s_lo}, {s_hi}]: no crop fits in the "
                f"image (need ratio in [{s_lo:g}, {1.0 / s_lo:g}] somewhere)"
            )
        return self

    @property
    def crops(self) -> bool:
        """True if the crop can differ from the whole image."""
        return self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0)

    @property
    def active(self) -> bool:
        """True if any augmentation is drawn (off: packs are exactly those of a navit without it)."""
        return self.crops or self.hflip > 0.0


class OutputConfig(_Stage):
    """Shard layout for `navit pack`."""

    shard_rows: int | None = Field(
        None, ge=1, description="sequences per shard (default: about 128 MB of patches per shard)"
    )
    epochs: int = Field(1, ge=1, le=10_000, description="independent plans (fresh draws) written in turn")


class PackConfig(_Stage):
    """Everything that determines a plan and its shards. Runtime knobs (workers, Ray address) are not
    here: they must not change the output."""

    seed: int = Field(0, ge=0, le=2**63 - 1, description="global seed of every random draw")
    source: SourceConfig = SourceConfig()
    resolution: ResolutionConfig = ResolutionConfig()
    token_drop: TokenDropConfig = TokenDropConfig()
    packing: PackingConfig = PackingConfig()
    decode: DecodeConfig = DecodeConfig()
    augment: AugmentConfig = AugmentConfig()
    output: OutputConfig = OutputConfig()

    def fingerprint(self) -> str:
        """Stable hash of the resolved config: equal fingerprints ⇒ identical output."""
        import hashlib

        # Augmentation off writes exactly what a navit without the section wrote: leave it out, so
        # packs made before it existed keep their fingerprint (and --resume still accepts them).
        exclude = None if self.augment.active else {"augment"}
        blob = json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Spec strings typed on the command line
# ----------------------------------------------------------------------------------------------------


def _floats(spec: str, parts: list[str], n: int, what: str) -> list[float]:
    if len(parts) != n:
        raise ConfigError(f"{what} '{spec}': expected {n} numbers after '{spec.split(':')[0]}'")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{what} '{spec}': not a number in {parts}") from None


def parse_resolution(spec: str) -> dict[str, Any]:
    """'native' | 'native:MAXSIDE' | 'uniform:LO:HI' | 'truncnormal:MEAN:STD:LO:HI' → field dict."""
    kind, *parts = spec.strip().lower().split(":")
    if kind == "native":
        if not parts:
            return {"kind": "native"}
        (cap,) = _floats(spec, parts, 1, "--resolution")
        return {"kind": "native", "native_max_side": int(cap)}
    if kind == "uniform":
        lo, hi = _floats(spec, parts, 2, "--resolution")
        return {"kind": "uniform", "lo": int(lo), "hi": int(hi)}
    if kind == "truncnormal":
        mean, std, lo, hi = _floats(spec, parts, 4, "--resolution")
        return {"kind": "truncnormal", "mean": mean, "std": std, "lo": int(lo), "hi": int(hi)}
    raise ConfigError(f"--resolution '{spec}': expected native, uniform:LO:HI or truncnormal:MEAN:STD:LO:HI")


def parse_token_drop(spec: str) -> dict[str, Any]:
    """'none' | 'constant:RATE' | 'beta:MEAN:MAX' | 'resolution:MIN:MAX[:JITTER]' → field dict."""
    kind, *parts = spec.strip().lower().split(":")
    if kind == "none":
        return {"kind": "none"}
    if kind == "constant":
        (rate,) = _floats(spec, parts, 1, "--token-drop")
        return {"kind": "constant", "rate": rate}
    if kind == "beta":
        mean, mx = _floats(spec, parts, 2, "--token-drop")
        return {"kind": "beta", "mean": mean, "max": mx}
    if kind == "resolution":
        vals = _floats(spec, parts, len(parts) if len(parts) in (2, 3) else 2, "--token-drop")
        out: dict[str, Any] = {"kind": "resolution", "min_rate": vals[0], "max_rate": vals[1]}
        if len(vals) == 3:
            out["jitter"] = vals[2]
        return out
    raise ConfigError(
        f"--token-drop '{spec}': expected none, constant:RATE, beta:MEAN:MAX or resolution:MIN:MAX[:JITTER]"
    )


def parse_crop(spec: str) -> dict[str, Any]:
    """'off' | 'SCALE_LO:SCALE_HI' | 'SCALE_LO:SCALE_HI:RATIO_LO:RATIO_HI' → augment field dict.

    With only the area range given, the ratio range is [3/4, 4/3] (torchvision's default)."""
    parts = spec.strip().lower().split(":")
    if parts in (["off"], ["none"]):
        return {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
    if len(parts) not in (2, 4):
        raise ConfigError(
            f"--crop '{spec}': expected off, SCALE_LO:SCALE_HI or SCALE_LO:SCALE_HI:RATIO_LO:RATIO_HI"
        )
    vals = _floats(spec, parts, len(parts), "--crop")
    ratio = (vals[2], vals[3]) if len(vals) == 4 else (3.0 / 4.0, 4.0 / 3.0)
    return {"crop_scale": (vals[0], vals[1]), "crop_ratio": ratio}


# ----------------------------------------------------------------------------------------------------
# Loading: YAML file + --set + flags → validated model, with one-line errors (packer/configfile.py)
# ----------------------------------------------------------------------------------------------------


def load_pack_config(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: dict[str, Any] | None = None,
) -> PackConfig:
    """The PackConfig of a YAML file (its top level, or its ``pack:`` section), then ``sets``
    (--set), then ``overrides`` (flags; None = not given)."""
    return build_config(PackConfig, file, overrides, section="pack", sets=sets)
