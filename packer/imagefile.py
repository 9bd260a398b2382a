"""Facts about image files shared by the header scan (plan stage) and the decoder (build stage).

The EXIF orientation tag, the one-line rejection reason for a path that cannot be opened, and the
name of a known format this Pillow build lacks: both stages use the same words, so `navit plan` and
`navit pack` count the same reasons. Lives at the package root so the planner never imports the
builder. Nothing here imports Ray.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError, features

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


class ImageHeaderError(Exception):
    """A header Pillow cannot open; ``reason`` is one user-readable line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def open_image_header(fp: Any, max_pixels: int) -> Image.Image:
    """``Image.open`` on a file object: parses the header only, no pixel decoded. The header scan and
    the decoder both open images here, so they reject the same files with the same words.

    Pillow refuses images above twice its limit inside ``open()``, and that limit is a process-wide
    global: it is set to ``decode.max_pixels`` for this call only and restored, so a reason depends on
    the file and the config alone, never on what ran earlier in the process, and other users of Pillow
    are left alone. The callers' own check of the header's size against ``max_pixels`` is the limit
    that counts, so Pillow's warning below twice the limit is silenced."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError:
        raise ImageHeaderError(
            f"decompression bomb: more than {2 * max_pixels} pixels "
            f"(Pillow's hard limit; decode.max_pixels is {max_pixels})"
        ) from None
    except UnidentifiedImageError:
        raise ImageHeaderError("not an image (unrecognised file format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageHeaderError(f"corrupt image header: {one_line(e)}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
