"""Messy test images, generated on the fly (tests never depend on files outside the repo).

Importable by any test: ``from fixtures_images import write_mode_zoo, write_bad_files,
messy_image_folder``. Everything is deterministic (fixed seeds), small, and fast to write.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def smooth_rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric colour image (h, w, 3) uint8: gradients plus a bright off-centre block, so
    rotations and flips are easy to tell apart and JPEG artefacts stay small."""
    rng = _rng(seed)
    ys = np.linspace(0, 1, h)[:, None]
    xs = np.linspace(0, 1, w)[None, :]
    r = 40 + 180 * xs + 0 * ys
    g = 40 + 180 * ys + 0 * xs
    b = 60 + 120 * (xs * ys) + rng.uniform(0, 20)
    img = np.stack([r, g, b], -1)
    y0, x0 = h // 8, w // 8
    img[y0 : y0 + max(1, h // 4), x0 : x0 + max(1, w // 3)] = (250, 250, 30)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(upright: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """A JPEG whose stored pixels are ``upright`` turned so that exif_transpose restores it."""
    store = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    img = Image.fromarray(upright, "RGB")
    if orientation != 1:
        img = img.transpose(store[orientation])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(img, "JPEG", quality=quality, exif=exif.tobytes())


def png_with_fake_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a decompression bomb
    as far as any header reader can tell, without allocating anything."""
    data = bytearray(encode(Image.new("L", (4, 4), 0), "PNG"))
    ihdr = 8  # after the PNG signature: length(4) 'IHDR'(4) data(13) crc(4)
    assert data[ihdr + 4 : ihdr + 8] == b"IHDR"
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13])) & 0xFFFFFFFF
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def mode_zoo() -> dict[str, bytes]:
    """name → file bytes, one per decoder path (modes, alpha, 16-bit, animation, EXIF)."""
    base = smooth_rgb(96, 64, seed=1)  # upright content is 96 wide, 64 high
    rgb = Image.fromarray(base, "RGB")
    out: dict[str, bytes] = {}
    out["rgb.png"] = encode(rgb, "PNG")
    out["rgb.jpg"] = encode(rgb, "JPEG", quality=95)
    out["l.png"] = encode(rgb.convert("L"), "PNG")
    la = rgb.convert("LA")
    la.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 96).astype(np.uint8), (64, 1)), "L"))
    out["la.png"] = encode(la, "PNG")
    rgba = rgb.copy()
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[:, :30] = 0  # a fully transparent left band: must become the background colour
    alpha[:, 30:50] = 128
    rgba.putalpha(Image.fromarray(alpha, "L"))
    out["rgba.png"] = encode(rgba, "PNG")
    p = rgb.quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    out["p.png"] = encode(p, "PNG")
    pt = p.copy()
    pt.info["transparency"] = int(np.asarray(p)[0, 0])  # the top-left colour is transparent
    out["p_transparent.png"] = encode(pt, "PNG", transparency=pt.info["transparency"])
    out["cmyk.jpg"] = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    g16 = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)  # full 16-bit range
    out["i16.png"] = encode(Image.fromarray(g16, "I;16"), "PNG")
    out["bilevel.png"] = encode(rgb.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1"), "PNG")
    frames = [Image.fromarray(smooth_rgb(96, 64, seed=s), "RGB").quantize(16) for s in (1, 2, 3)]
    frames[1] = Image.fromarray(255 - base, "RGB").quantize(16)  # frame 2 differs a lot
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["animated.gif"] = buf.getvalue()
    for o in (3, 6, 8):
        out[f"exif{o}.jpg"] = exif_rotated_jpeg(base, o)
    return out


def bad_files() -> dict[str, bytes]:
    """name → bytes of inputs that must be rejected, each with a distinct reason."""
    good_jpg = encode(Image.fromarray(smooth_rgb(200, 150, seed=4), "RGB"), "JPEG", quality=90)
    return {
        "zero.jpg": b"",
        "text.jpg": b"this is not an image, just text with an image extension\n" * 4,
        "garbage.png": _rng(7).integers(0, 256, 600, dtype=np.uint8).tobytes(),
        "truncated.jpg": good_jpg[: len(good_jpg) // 3],
        "bomb.png": png_with_fake_size(40_000, 40_000),
    }


def write_files(root: str | Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Write ``files`` under ``root``; returns name → path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths[name] = path
    return paths


def write_mode_zoo(root: str | Path) -> dict[str, Path]:
    return write_files(root, mode_zoo())


def write_bad_files(root: str | Path) -> dict[str, Path]:
    return write_files(root, bad_files())


def messy_image_folder(root: str | Path, n_good: int = 24, seed: int = 0) -> dict[str, list[str]]:
    """A labeled ImageFolder mixing synth images, every decoder path, tiny and extreme-aspect images,
    and bad files. Returns {'good': [...relative paths], 'bad': [...]} (bad = must be rejected)."""
    from packer.synth import generate

    root = Path(root)
    infos = generate(root, n=n_good, seed=seed, threads=1)
    good = [i.relpath for i in infos]
    zoo = {f"circle/zoo_{k}": v for k, v in mode_zoo().items()}
    zoo["square/tiny.png"] = encode(Image.fromarray(smooth_rgb(5, 7), "RGB"), "PNG")  # < 1 patch
    zoo["square/thin.png"] = encode(Image.fromarray(smooth_rgb(500, 10), "RGB"), "PNG")  # 1:50
    write_files(root, zoo)
    good += sorted(zoo)
    bad = {f"triangle/{k}": v for k, v in bad_files().items()}
    write_files(root, bad)
    return {"good": sorted(good), "bad": sorted(bad)}
