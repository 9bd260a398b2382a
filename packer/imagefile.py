"""Facts about image files shared by the header scan (plan stage) and the decoder (build stage).

The EXIF orientation tag, the one-line rejection reason for a path that cannot be opened, and the
name of a known format this Pillow build lacks: both stages use the same words, so `navit plan` and
`navit pack` count the same reasons. Lives at the package root so the planner never imports the
builder. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, features

from packer.localfile import NotRegularFile

EXIF_ORIENTATION = 0x0112


def one_line(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip()
    return text.splitlines()[0] if text else type(e).__name__


def unreadable_reason(err: OSError) -> str:
    """The one-line rejection reason for a path that cannot be opened (shared with the header scan,
    so plan and pack count the same reasons)."""
    if isinstance(err, FileNotFoundError):
        return "unreadable path: file not found"
    if isinstance(err, PermissionError):
        return "unreadable path: permission denied"
    if isinstance(err, IsADirectoryError):
        return "unreadable path: is a directory"
    if isinstance(err, NotRegularFile):
        return str(err.strerror)  # "not a regular file: named pipe (FIFO)"
    return f"unreadable path: {one_line(err)}"


def unsupported_format(data: bytes) -> str | None:
    """Name a known format this Pillow build was compiled without (so the reason says so)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and not features.check("webp"):
        return "WebP support not compiled in"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF support not compiled in" if not features.check("avif") else None
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "HEIC is not supported by Pillow"
    return None


@contextmanager
def pillow_limit(max_pixels: int) -> Iterator[None]:
    """Within the block, Pillow's decompression-bomb limit is ``decode.max_pixels``; restored after.

    Pillow refuses images above twice its limit inside ``open()``, and the limit is a process-wide
    global. Setting it from the config around each open (never leaving it changed) makes a rejection
    reason depend only on the file and the config, not on what ran earlier in the process, and leaves
    other users of Pillow in the process alone."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def pillow_bomb_reason(max_pixels: int) -> str:
    """The rejection reason when Pillow's own limit (2 x ``max_pixels``, see above) refuses a file."""
    return (
        f"decompression bomb: more than {2 * max_pixels} pixels "
        f"(Pillow's hard limit; decode.max_pixels is {max_pixels})"
    )
