"""Decoding one image into its planned, kept patches (the per-image work of `navit pack`).

Pipeline for one image, in this fixed order (the order is part of the output contract: the round-trip
test replays it):

1. read the file's bytes (local path, or a URI through pyarrow.fs);
2. parse the header only and reject decompression bombs (``decode.max_pixels``) *before* decoding;
3. JPEG: ``Image.draft`` to the smallest DCT scale (1/1, 1/2, 1/4, 1/8) whose output still covers the
   planned size — computed in the *stored* orientation, so EXIF orientations 5-8 swap the request;
4. decode, then apply the EXIF orientation (the same transposes as ``ImageOps.exif_transpose``);
5. convert any mode to RGB (alpha composited on ``decode.background``; 16-bit scaled, not clipped;
   first frame of animations);
6. augmenting (:mod:`packer.plan.augment`): cut the planned crop box out of the upright image;
7. antialiased resize (bicubic, ``reducing_gap``) to exactly (grid_w·p, grid_h·p); augmenting: mirror
   it left-right when the plan says so;
8. patchify to uint8 tokens (n_full, p·p·3), each patch in (row, col, channel) order, and keep the
   planned tokens (:func:`packer.plan.sampling.kept_token_indices`).

Every failure is a :class:`DecodeError` whose ``reason`` is one user-readable line; the pipeline
records it as a rejection. Nothing here imports Ray.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from packer import members
from packer.config import DecodeConfig
from packer.imagefile import (
    EXIF_ORIENTATION,
    ImageHeaderError,
    one_line,
    open_image_header,
    unreadable_reason,
    unsupported_format,
)
from packer.localfile import open_regular

RESAMPLE = Image.Resampling.BICUBIC
# Downscales by more than this factor first reduce by an integer box filter (fast, and visually
# indistinguishable at 3.0 per Pillow's docs), then finish with the bicubic filter.
REDUCING_GAP = 3.0
# EXIF orientation → the transpose that makes the image upright (as ImageOps.exif_transpose).
_ORIENT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DecodeError(Exception):
    """An image that cannot be packed. ``reason`` is one line, stable for the same input."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Tokens:
    """One image's kept tokens.

    patches: (n_kept, p*p*3) uint8; pos_h, pos_w: (n_kept,) int16 patch row / column in the grid.
    """

    patches: np.ndarray
    pos_h: np.ndarray
    pos_w: np.ndarray


# ----------------------------------------------------------------------------------------------------
# 1. Bytes
# ----------------------------------------------------------------------------------------------------


def read_bytes(path: str) -> bytes:
    """A local path, a URI (s3://bucket/key, gs://…) or a tar member / Parquet row locator
    (packer.members) → its bytes; DecodeError if unreadable or empty."""
    try:
        if members.is_locator(path):
            data = members.read_bytes(path)
        elif "://" in path and not path.startswith("file://"):
            from packer.storage import object_filesystem

            fs, key = object_filesystem(path)  # the environment's endpoint/credentials (packer.storage)
            with fs.open_input_stream(key) as f:
                data = f.read()
        else:
            local = path[len("file://") :] if path.startswith("file://") else path
            with open_regular(local) as f:  # never blocks on a FIFO, never reads a device
                data = f.read()
    except OSError as e:
        raise DecodeError(unreadable_reason(e)) from None
    except members.MemberError as e:
        raise DecodeError(e.reason) from None
    if not data:
        raise DecodeError("zero-byte file")
    return data


# ----------------------------------------------------------------------------------------------------
# 2-5. Header check, draft, decode, orientation, RGB
# ----------------------------------------------------------------------------------------------------


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header (no pixel decoded) and enforce the pixel limit. DecodeError on failure."""
    if not data:
        raise DecodeError("zero-byte file")
    missing = unsupported_format(data)
    if missing:
        raise DecodeError(missing)
    try:
        img = open_image_header(io.BytesIO(data), max_pixels)
    except ImageHeaderError as e:
        raise DecodeError(e.reason) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError(f"corrupt image header: size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError(f"decompression bomb: {w}x{h} = {w * h} pixels > decode.max_pixels ({max_pixels})")
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8), 1 when absent or unreadable."""
    try:
        o = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block must not reject an otherwise good image
        return 1
    return o if 1 <= o <= 8 else 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float greyscale → 'L', scaling the full range (not clipping)."""
    arr = np.asarray(img)
    if img.mode == "F":
        a = arr.astype(np.float64)
        # Float images: [0, 1] is the usual convention; larger values are treated as 16-bit counts.
        scale = 255.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else 255.0 / 65535.0
        out = np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255)
    else:
        # I;16 is 0..65535; mode 'I' (32-bit) holding 16-bit data is the usual case (PNG, TIFF).
        a = np.clip(arr.astype(np.int64), 0, 65535)
        out = (a * 255 + 32767) // 65535  # round to nearest: 0 → 0, 65535 → 255
    return Image.fromarray(out.astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode → 'RGB'. Transparency is composited on ``background``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    elif mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
        mode = "LA"
    elif mode == "RGB" and "transparency" in img.info:  # pragma: no cover - RGB handled above
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        img = _to_8bit(img)
        mode = "L"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return img
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, I;16 handled above: Pillow's own conversions.
    return img.convert("RGB")


Box = tuple[float, float, float, float]


def decode_rgb(
    data: bytes,
    target_wh: tuple[int, int] | None,
    cfg: DecodeConfig,
    crop: tuple[int, int, int, int] | None = None,
) -> tuple[Image.Image, Box | None]:
    """Bytes → (upright RGB image, source box), decoded at a reduced JPEG scale when that still covers
    ``target_wh`` (upright width, height) — for the ``crop`` (x0, y0, x1, y1 in upright source
    pixels) when one is given. Not resized. DecodeError on any failure.

    The box is None, or the region of the image that holds the original extent (or the crop): when
    the DCT scale does not divide the size, the last row/column of the scaled image is partial, and
    resizing that box (not the whole image) maps the original extent exactly."""
    img = open_image(data, cfg.max_pixels)
    orientation = exif_orientation(img)
    swap = orientation in (5, 6, 7, 8)  # stored with width and height swapped
    upright_wh = (img.size[1], img.size[0]) if swap else img.size
    if crop is not None and not (
        0 <= crop[0] < crop[2] <= upright_wh[0] and 0 <= crop[1] < crop[3] <= upright_wh[1]
    ):
        # The plan drew the crop from this file's header: a different size means the file changed.
        raise DecodeError(f"crop box {tuple(crop)} outside the {upright_wh[0]}x{upright_wh[1]} image")
    box: Box | None = None
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animations: the first frame
        if cfg.jpeg_draft and target_wh is not None and img.format == "JPEG":
            tw, th = target_wh
            if crop is not None:  # the crop must cover the target: ask for the whole image scaled alike
                cw, ch = max(crop[2] - crop[0], 1), max(crop[3] - crop[1], 1)
                tw = -(-tw * upright_wh[0] // cw)
                th = -(-th * upright_wh[1] // ch)
            # The request is in stored orientation.
            req = (th, tw) if swap else (tw, th)
            res = img.draft(img.mode, req)
            if res is not None:
                box = res[1]
        img.load()
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {one_line(e)}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        msg = one_line(e)
        if "decoder" in msg and "not available" in msg:
            raise DecodeError(f"format support not compiled in ({msg})") from None
        raise DecodeError(f"corrupt or truncated image: {msg}") from None
    if box is not None and box[2:] == tuple(float(v) for v in img.size):
        box = None  # the scale divides the size: the whole image is the original extent
    try:
        img = to_rgb(img, tuple(cfg.background))  # type: ignore[arg-type]
    except (OSError, ValueError) as e:
        raise DecodeError(f"cannot convert mode {img.mode} to RGB: {one_line(e)}") from None
    if orientation in _ORIENT_TRANSPOSE:
        if box is not None:
            box = _transpose_box(box, img.size, orientation)
        img = img.transpose(_ORIENT_TRANSPOSE[orientation])
    if crop is not None:
        box = _crop_box(crop, box or (0.0, 0.0, float(img.width), float(img.height)), upright_wh)
    return img, box


def _crop_box(crop: tuple[int, int, int, int], extent: Box, upright_wh: tuple[int, int]) -> Box:
    """Where the crop (in full-size upright pixels) lies in the decoded image whose ``extent`` box
    holds the full upright image (the whole image, unless JPEG-draft scaled)."""
    ex0, ey0, ex1, ey1 = extent
    sx, sy = (ex1 - ex0) / upright_wh[0], (ey1 - ey0) / upright_wh[1]
    x0, y0, x1, y1 = crop
    return (ex0 + x0 * sx, ey0 + y0 * sy, ex0 + x1 * sx, ey0 + y1 * sy)


def _transpose_box(box: Box, stored_size: tuple[int, int], orientation: int) -> Box:
    """Where a (0, 0, bw, bh) box anchored at the stored origin lands after the orientation transpose:
    flips and rotations move the partial last row/column to the other side."""
    _, _, bw, bh = box
    sw, sh = stored_size
    if orientation == 2:  # mirror x
        return (sw - bw, 0.0, float(sw), bh)
    if orientation == 3:  # half turn
        return (sw - bw, sh - bh, float(sw), float(sh))
    if orientation == 4:  # mirror y
        return (0.0, sh - bh, bw, float(sh))
    if orientation == 5:  # transpose: (x, y) → (y, x)
        return (0.0, 0.0, bh, bw)
    if orientation == 6:  # quarter turn clockwise: (x, y) → (sh - y, x)
        return (sh - bh, 0.0, float(sh), bw)
    if orientation == 7:  # transverse: (x, y) → (sh - y, sw - x)
        return (sh - bh, sw - bw, float(sh), float(sw))
    # 8: quarter turn counter-clockwise: (x, y) → (y, sw - x)
    return (0.0, sw - bw, bh, float(sw))


# ----------------------------------------------------------------------------------------------------
# 6-7. Resize, patchify, keep
# ----------------------------------------------------------------------------------------------------


def cut_box(img: Image.Image, box: Box) -> tuple[Image.Image, Box | None]:
    """Cut the whole pixels covering ``box`` out of ``img``: (the cut, ``box`` relative to it, or None
    when it is the whole cut). A crop then resizes without its filter reading pixels outside the crop
    (Pillow's resize box reads beyond its edges); an integer box is an exact ``img.crop(box)``."""
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x1, y1 = min(int(np.ceil(box[2])), img.width), min(int(np.ceil(box[3])), img.height)
    cut = img.crop((x0, y0, x1, y1))
    rel = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    return cut, None if rel == (0.0, 0.0, float(cut.width), float(cut.height)) else rel


def resize_exact(img: Image.Image, width: int, height: int, box: Box | None = None) -> np.ndarray:
    """Antialiased resize of ``box`` (default: the whole image) to exactly (width, height):
    (height, width, 3) uint8."""
    if img.size == (width, height) and box is None:
        out = img
    else:
        out = img.resize((width, height), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (height, width, 3):
        raise DecodeError(f"internal: resized to {arr.shape}, expected {(height, width, 3)}")
    return arr


def patchify(arr: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) with H = gh·p, W = gw·p → (gh·gw, p·p·C), row-major grid, patch in (row, col, C)."""
    h, w, c = arr.shape
    p = patch_size
    gh, gw = h // p, w // p
    return arr.reshape(gh, p, gw, p, c).transpose(0, 2, 1, 3, 4).reshape(gh * gw, p * p * c)


def select_tokens(
    arr: np.ndarray, patch_size: int, keep: np.ndarray, out: np.ndarray | None = None
) -> Tokens:
    """Gather the kept patches straight from the (H, W, 3) image (no full patch tensor).

    keep: sorted int indices into the row-major (gh, gw) grid. ``out`` (n_kept, p*p*3) uint8, e.g.
    a slice of a shard row, receives the patches in place (one strided copy when nothing is dropped)."""
    h, w, c = arr.shape
    p = patch_size
    gh, gw = h // p, w // p
    keep = np.asarray(keep, dtype=np.int64)
    rows, cols = keep // gw, keep % gw
    grid = arr.reshape(gh, p, gw, p, c).transpose(0, 2, 1, 3, 4)  # (gh, gw, p, p, c) view
    if out is None:
        out = np.empty((len(keep), p * p * c), np.uint8)
    if len(keep) == gh * gw:
        out.reshape(gh, gw, p, p, c)[...] = grid  # all kept: keep == arange, copy the view directly
    else:
        out.reshape(len(keep), p, p, c)[...] = grid[rows, cols]  # (n_kept, p, p, c)
    return Tokens(out, rows.astype(np.int16), cols.astype(np.int16))


def kept_indices(seed: int, epoch: int, key: str, n_full: int, n_kept: int) -> np.ndarray:
    """Which tokens of the row-major grid are kept: decided by packer.plan.sampling from the seed."""
    if n_kept == n_full:  # nothing dropped: every index, sorted (no draw needed)
        return np.arange(n_full, dtype=np.int64)
    from packer.plan.sampling import kept_token_indices

    keep = np.asarray(kept_token_indices(seed, epoch, key, n_full, n_kept), dtype=np.int64)
    if keep.shape != (n_kept,) or (n_kept and (keep[0] < 0 or keep[-1] >= n_full)):
        raise RuntimeError(f"kept_token_indices returned {keep.shape} indices for n_kept={n_kept}")
    return keep


def load_resized(
    source: str | bytes,
    grid_h: int,
    grid_w: int,
    patch_size: int,
    cfg: DecodeConfig,
    crop: tuple[int, int, int, int] | None = None,
    hflip: bool = False,
) -> np.ndarray:
    """Path/URI or bytes → the planned-size RGB image (grid_h·p, grid_w·p, 3) uint8. DecodeError.

    Augmentation (packer.plan.augment): ``crop`` (x0, y0, x1, y1 in upright source pixels) is cut out
    before resizing, and ``hflip`` mirrors the resized image; PNG / non-draft sources give exactly
    ``flip(orient(img).crop(crop).resize(size, BICUBIC, reducing_gap=3))``."""
    data = read_bytes(source) if isinstance(source, str) else source
    if not data:
        raise DecodeError("zero-byte file")
    tw, th = grid_w * patch_size, grid_h * patch_size
    img, box = decode_rgb(data, (tw, th), cfg, crop)
    try:
        if box is not None and crop is not None:
            img, box = cut_box(img, box)
        arr = resize_exact(img, tw, th, box)
    except (OSError, ValueError) as e:
        raise DecodeError(f"cannot resize: {one_line(e)}") from None
    # Flip after the resize: exact on uint8 pixels, and fewer pixels to move.
    return np.ascontiguousarray(arr[:, ::-1]) if hflip else arr


def decode_tokens(
    source: str | bytes,
    *,
    grid_h: int,
    grid_w: int,
    patch_size: int,
    n_kept: int,
    seed: int,
    epoch: int,
    key: str,
    cfg: DecodeConfig,
    out: np.ndarray | None = None,
    crop: tuple[int, int, int, int] | None = None,
    hflip: bool = False,
) -> Tokens:
    """The whole per-image job: read → decode → (crop) → resize → (flip) → patchify → keep the
    planned tokens.

    ``out`` (n_kept, p*p*3) uint8 receives the patches in place (see :func:`select_tokens`); it is
    left untouched when decoding fails."""
    arr = load_resized(source, grid_h, grid_w, patch_size, cfg, crop, hflip)
    keep = kept_indices(seed, epoch, key, grid_h * grid_w, n_kept)
    return select_tokens(arr, patch_size, keep, out)


# Truncated files must fail, not be silently padded with grey (Pillow's default is already False;
# set it explicitly because a library elsewhere in the process could flip it).
ImageFile.LOAD_TRUNCATED_IMAGES = False
