"""`navit synth`: a deterministic, labeled ImageFolder of synthetic images for tests and demos.

Each class is a *content* category (a shape or a texture drawn at random scale, position, angle and
colour over a random gradient background), so a model must look at pixels to tell classes apart: the
image size, aspect ratio, file format and colour mode are drawn from one distribution, independently
of the label.

Every image has its own generator seeded by (seed, index), so the output is byte-identical for a given
(seed, n) whatever the order of generation, and image i is the same whatever ``n`` is.

Layout: ``OUT/<class>/img_000123.<jpg|png>`` (ImageFolder). About one JPEG in five carries an EXIF
orientation (3, 6 or 8) with its pixels stored rotated so that ``ImageOps.exif_transpose`` makes it
upright.
"""

from __future__ import annotations

import io
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("checker", "circle", "cross", "square", "stripes", "triangle")

MIN_SIDE = 48
MAX_SIDE = 1024
MAX_ASPECT = 4.0
JPEG_QUALITY = 90
EXIF_ORIENTATION_TAG = 0x0112
# Pixels stored so that exif_transpose (which applies the *forward* transform) restores the upright
# image: orientation 6 is undone by ROTATE_270, so the stored pixels are upright.transpose(ROTATE_90).
_STORE_FOR_ORIENTATION = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class SynthImage:
    """What was generated for one index (returned so tests can check the distribution)."""

    index: int
    relpath: str
    label: int
    width: int  # upright (after EXIF orientation)
    height: int
    mode: str
    format: str
    orientation: int  # 1 = none


def _draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """Both sides log-uniform in [MIN_SIDE, MAX_SIDE], redrawn until the aspect ratio is within 1:4..4:1.

    Log-uniform keeps most images small (median ~220 px) so demos are fast, with a tail up to 1 MP.
    """
    lo, hi = math.log(MIN_SIDE), math.log(MAX_SIDE)
    while True:
        w, h = (int(round(math.exp(v))) for v in rng.uniform(lo, hi, size=2))
        if max(w, h) <= MAX_ASPECT * min(w, h):
            return w, h


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A linear gradient between two random colours at a random angle: (h, w, 3) uint8."""
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    t = np.float32(math.cos(theta)) * xs + np.float32(math.sin(theta)) * ys  # (h, w)
    lo, hi = float(t.min()), float(t.max())
    t8 = Image.fromarray(((t - lo) * np.float32(255.0 / max(hi - lo, 1e-6))).astype(np.uint8), "L")
    # One 256-entry lookup table per channel (PIL's point() is a C loop): far faster than
    # broadcasting a float (h, w, 3) blend in numpy.
    k = np.arange(256, dtype=np.float64) / 255.0
    bands = [t8.point([int(v) for v in c0[i] * (1 - k) + c1[i] * k]) for i in range(3)]
    return np.asarray(Image.merge("RGB", bands)).copy()


def _contrasting_colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least some distance from the local background, so the shape is visible."""
    for _ in range(16):
        c = rng.integers(0, 256, 3)
        if np.abs(c.astype(np.int32) - avoid.astype(np.int32)).sum() > 180:
            break
    return int(c[0]), int(c[1]), int(c[2])


def _rotated_polygon(cx: float, cy: float, pts: list[tuple[float, float]], angle: float) -> list[tuple]:
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _draw_shape(img: Image.Image, rng: np.random.Generator, cls: str, bg: np.ndarray) -> None:
    """Draw one instance of class ``cls`` at a random scale / position / angle / colour."""
    w, h = img.size
    side = min(w, h)
    r = rng.uniform(0.18, 0.42) * side  # half-size of the shape
    cx = rng.uniform(r, w - r)
    cy = rng.uniform(r, h - r)
    angle = rng.uniform(0, 2 * math.pi)
    colour = _contrasting_colour(rng, bg[int(cy), int(cx)])
    draw = ImageDraw.Draw(img)
    if cls == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif cls == "square":
        s = r / math.sqrt(2) * 1.3
        draw.polygon(_rotated_polygon(cx, cy, [(-s, -s), (s, -s), (s, s), (-s, s)], angle), fill=colour)
    elif cls == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
        draw.polygon(_rotated_polygon(cx, cy, pts, angle), fill=colour)
    elif cls == "cross":
        t = r * rng.uniform(0.22, 0.38)  # arm half-thickness
        arm = [(-r, -t), (r, -t), (r, t), (-r, t)]
        draw.polygon(_rotated_polygon(cx, cy, arm, angle), fill=colour)
        draw.polygon(_rotated_polygon(cx, cy, arm, angle + math.pi / 2), fill=colour)
    else:
        raise ValueError(f"not a shape class: {cls}")


def _draw_texture(arr: np.ndarray, rng: np.random.Generator, cls: str) -> np.ndarray:
    """Stripes or a checkerboard over a random rectangle covering 40-100% of each side."""
    h, w, _ = arr.shape
    side = min(w, h)
    rw = int(rng.uniform(0.4, 1.0) * w)
    rh = int(rng.uniform(0.4, 1.0) * h)
    x0 = int(rng.integers(0, w - rw + 1))
    y0 = int(rng.integers(0, h - rh + 1))
    period = rng.uniform(0.06, 0.2) * side  # full period in pixels; >= ~3 px on a 48-px image
    angle = rng.uniform(0, math.pi)
    ys = np.arange(rh, dtype=np.float32)[:, None]
    xs = np.arange(rw, dtype=np.float32)[None, :]
    u = xs * math.cos(angle) + ys * math.sin(angle)
    if cls == "stripes":
        mask = np.floor(u / (period / 2)).astype(np.int64) % 2 == 0
    elif cls == "checker":
        v = -xs * math.sin(angle) + ys * math.cos(angle)
        mask = (np.floor(u / (period / 2)) + np.floor(v / (period / 2))).astype(np.int64) % 2 == 0
    else:
        raise ValueError(f"not a texture class: {cls}")
    colour = np.array(_contrasting_colour(rng, arr[y0 + rh // 2, x0 + rw // 2]), dtype=np.uint8)
    region = arr[y0 : y0 + rh, x0 : x0 + rw]
    region[mask] = colour
    return arr


def _render(rng: np.random.Generator, cls: str, w: int, h: int) -> Image.Image:
    """The upright RGB image of one sample."""
    arr = _background(rng, w, h)
    if cls in ("stripes", "checker"):
        return Image.fromarray(_draw_texture(arr, rng, cls), "RGB")
    img = Image.fromarray(arr, "RGB")
    _draw_shape(img, rng, cls, arr)
    return img


def _encode(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, str, int]:
    """Pick mode / format / orientation (independently of the label) and encode.

    Returns (bytes, mode, format, orientation).
    """
    u = float(rng.uniform())
    if u < 0.55:
        mode, fmt = "RGB", "JPEG"
    elif u < 0.65:
        mode, fmt = "L", "JPEG"
    elif u < 0.77:
        mode, fmt = "RGB", "PNG"
    elif u < 0.85:
        mode, fmt = "L", "PNG"
    elif u < 0.93:
        mode, fmt = "RGBA", "PNG"
    else:
        mode, fmt = "P", "PNG"
    orientation = 1
    if fmt == "JPEG" and rng.uniform() < 0.35:
        orientation = int(rng.choice([3, 6, 8]))
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        # Mostly opaque with a soft transparent corner: the content stays visible after compositing.
        w, h = img.size
        ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
        xs = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
        alpha = np.clip(255 * (1.6 - (xs + ys)), 0, 255).astype(np.uint8)
        img = img.copy()
        img.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "P":
        img = img.quantize(colors=64, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    if fmt == "JPEG":
        if orientation != 1:
            img = img.transpose(_STORE_FOR_ORIENTATION[orientation])
            exif = Image.Exif()
            exif[EXIF_ORIENTATION_TAG] = orientation
            img.save(buf, "JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())
        else:
            img.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        # compress_level 1: ~5x faster than the default and still deterministic.
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue(), mode, fmt, orientation


def synth_one(seed: int, index: int, classes: tuple[str, ...] = CLASSES) -> tuple[SynthImage, bytes]:
    """Generate image ``index`` of the dataset with ``seed``: its description and its file bytes."""
    # Three independent streams: geometry and encoding draws never depend on which class (and so
    # how many content draws) the image has, so size, aspect, mode and format carry no label signal.
    rng_geom, rng_content, rng_enc = (np.random.default_rng([seed, index, k]) for k in range(3))
    label = index % len(classes)  # exact class balance
    w, h = _draw_size(rng_geom)
    img = _render(rng_content, classes[label], w, h)
    data, mode, fmt, orientation = _encode(img, rng_enc)
    ext = "jpg" if fmt == "JPEG" else "png"
    rel = f"{classes[label]}/img_{index:06d}.{ext}"
    return SynthImage(index, rel, label, w, h, mode, fmt, orientation), data


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def generate(
    out: str | Path,
    n: int = 600,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
    threads: int | None = None,
) -> list[SynthImage]:
    """Write ``n`` images into ``out`` as an ImageFolder; returns what was written, in index order."""
    if n < 0:
        raise ValueError("n must be >= 0")
    root = Path(out)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)

    def one(i: int) -> SynthImage:
        info, data = synth_one(seed, i, classes)
        _atomic_write(root / info.relpath, data)
        return info

    # Threads: PIL's encoders and numpy release the GIL. Each image has its own generator, so the
    # files do not depend on which thread made them.
    workers = threads or min(4, os.cpu_count() or 1)
    if workers <= 1:
        return [one(i) for i in range(n)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))
