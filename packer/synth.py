"""`navit synth`: a deterministic, labeled ImageFolder of synthetic images for tests and demos.

Two tasks (``task=``):

- ``shapes`` (the default): each class is a *content* category (a shape or a texture drawn at random
  scale, position, angle and colour over a random gradient background). Sizes 48-1024 px, aspect
  1:4-4:1. Hard for a small ViT trained from scratch (textures finer than a patch).
- ``aspect`` (``make demo``): one dark, axis-aligned ellipse or rectangle on a light tinted
  background, whose class is its kind *and its own aspect ratio* (width/height 1/2, 1 or 2). The
  image's aspect ratio is drawn independently of the label (log-uniform in 1:2-2:1), so squashing
  an image to a square changes the shape's apparent aspect by up to 2x either way: a model that
  sees square-resized images cannot tell ``circle`` in a wide image from ``ellipse_tall`` in a
  square one, while one that keeps the native aspect ratio (NaViT) can. The shapes span a few
  patches, so a small ViT learns them in minutes on a CPU.

In both, a model must look at pixels to tell classes apart: the image size, aspect ratio, file
format and colour mode are drawn from one distribution, independently of the label.

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

# Task "aspect": what each class draws — (shape, width / height of the shape). Sorted names, so the
# label index equals the folder's index in `navit pack`'s sorted class list.
ASPECT_SHAPES: dict[str, tuple[str, float]] = {
    "circle": ("ellipse", 1.0),
    "ellipse_tall": ("ellipse", 0.5),
    "ellipse_wide": ("ellipse", 2.0),
    "rect_tall": ("rect", 0.5),
    "rect_wide": ("rect", 2.0),
    "square": ("rect", 1.0),
}
ASPECT_CLASSES: tuple[str, ...] = tuple(sorted(ASPECT_SHAPES))
TASKS: dict[str, tuple[str, ...]] = {"shapes": CLASSES, "aspect": ASPECT_CLASSES}
# Image geometry of the aspect task: longer side log-uniform in [64, 256] px (small: the demo
# trains at 32-128 px), image aspect ratio log-uniform in [1/2, 2].
ASPECT_MIN_LONG_SIDE = 64
ASPECT_MAX_LONG_SIDE = 256
ASPECT_MAX_IMAGE_ASPECT = 2.0
ASPECT_MARGIN = 0.05  # the shape keeps this fraction of each side clear of the border
ASPECT_FILL = (0.45, 0.9)  # shape size as a fraction of the largest that fits
ASPECT_BG_RANGE = (150, 256)  # background channels (light)
ASPECT_INK_MAX = 110  # shape channels are in [0, ASPECT_INK_MAX) (dark)

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


def _draw_size_aspect(rng: np.random.Generator) -> tuple[int, int]:
    """Aspect task: longer side and image aspect ratio (w/h) both log-uniform; (w, h)."""
    long_side = math.exp(rng.uniform(math.log(ASPECT_MIN_LONG_SIDE), math.log(ASPECT_MAX_LONG_SIDE)))
    r = math.log(ASPECT_MAX_IMAGE_ASPECT)
    aspect = math.exp(rng.uniform(-r, r))
    w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    return int(round(w)), int(round(h))


def shape_box(rng: np.random.Generator, cls: str, w: int, h: int) -> tuple[int, int, int, int]:
    """Aspect task: the shape's pixel box (x0, y0, x1, y1), exclusive ends, inside a w×h image.

    Its width/height is the class's aspect ratio (up to rounding to whole pixels), its size a random
    fraction of the largest such box that fits inside the margins, its position uniform."""
    a = ASPECT_SHAPES[cls][1]
    inner_w, inner_h = (1 - 2 * ASPECT_MARGIN) * w, (1 - 2 * ASPECT_MARGIN) * h
    bw = rng.uniform(*ASPECT_FILL) * min(inner_w, inner_h * a)  # width of the shape, px
    bw = max(2, int(round(bw)))
    bh = max(2, int(round(bw / a)))
    x_lo, y_lo = int(math.ceil(ASPECT_MARGIN * w)), int(math.ceil(ASPECT_MARGIN * h))
    x0 = int(rng.integers(x_lo, max(x_lo, w - x_lo - bw) + 1))
    y0 = int(rng.integers(y_lo, max(y_lo, h - y_lo - bh) + 1))
    return x0, y0, x0 + bw, y0 + bh


def _render_aspect(rng: np.random.Generator, cls: str, w: int, h: int) -> Image.Image:
    """Aspect task: a dark ellipse or rectangle of the class's aspect ratio on a light gradient.

    Dark-on-light with random tints keeps one polarity (the shape is darker than its background):
    with arbitrary colour pairs a small ViT needs far longer to learn the same shapes."""
    lo, hi = ASPECT_BG_RANGE
    c0 = rng.integers(lo, hi, 3)
    c1 = np.clip(c0 + rng.integers(-40, 41, 3), lo, hi - 1)
    theta = rng.uniform(0, 2 * math.pi)
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    t = np.float32(math.cos(theta)) * xs + np.float32(math.sin(theta)) * ys  # (h, w, 1)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = (c0.astype(np.float32) * (1 - t) + c1.astype(np.float32) * t).astype(np.uint8)  # (h, w, 3)
    img = Image.fromarray(bg, "RGB")
    x0, y0, x1, y1 = shape_box(rng, cls, w, h)
    ink = tuple(int(c) for c in rng.integers(0, ASPECT_INK_MAX, 3))
    draw = ImageDraw.Draw(img)
    if ASPECT_SHAPES[cls][0] == "ellipse":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=ink)  # PIL boxes are inclusive
    else:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=ink)
    return img


def task_classes(task: str, classes: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """``classes`` (default: the task's own), checked to be drawable by ``task``."""
    if task not in TASKS:
        raise ValueError(f"unknown synth task {task!r}: choose one of {sorted(TASKS)}")
    classes = TASKS[task] if classes is None else tuple(classes)
    if not classes:
        raise ValueError("no classes given")
    known = ASPECT_SHAPES if task == "aspect" else CLASSES
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise ValueError(f"task {task!r} has no class(es) {unknown}; known: {list(known)}")
    return classes


def render_upright(
    seed: int, index: int, classes: tuple[str, ...] | None = None, task: str = "shapes"
) -> tuple[Image.Image, int]:
    """The upright RGB image ``index`` of (seed, task) before encoding, and its label."""
    classes = task_classes(task, classes)
    label = index % len(classes)  # exact class balance
    rng_geom, rng_content = (np.random.default_rng([seed, index, k]) for k in range(2))
    if task == "aspect":
        w, h = _draw_size_aspect(rng_geom)
        return _render_aspect(rng_content, classes[label], w, h), label
    w, h = _draw_size(rng_geom)
    return _render(rng_content, classes[label], w, h), label


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


def synth_one(
    seed: int, index: int, classes: tuple[str, ...] | None = None, task: str = "shapes"
) -> tuple[SynthImage, bytes]:
    """Generate image ``index`` of the dataset with ``seed``: its description and its file bytes.

    ``classes`` defaults to the task's classes (``TASKS[task]``); label = index mod len(classes)."""
    classes = task_classes(task, classes)
    # Three independent streams (geometry, content, encoding): geometry and encoding draws never
    # depend on which class (and so how many content draws) the image has, so size, aspect, mode
    # and format carry no label signal.
    img, label = render_upright(seed, index, classes, task)
    w, h = img.size
    data, mode, fmt, orientation = _encode(img, np.random.default_rng([seed, index, 2]))
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
    classes: tuple[str, ...] | None = None,
    threads: int | None = None,
    task: str = "shapes",
) -> list[SynthImage]:
    """Write ``n`` images of ``task`` into ``out`` as an ImageFolder; returns what was written, in
    index order."""
    if n < 0:
        raise ValueError("n must be >= 0")
    classes = task_classes(task, classes)
    root = Path(out)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)

    def one(i: int) -> SynthImage:
        info, data = synth_one(seed, i, classes, task)
        _atomic_write(root / info.relpath, data)
        return info

    # Threads: PIL's encoders and numpy release the GIL. Each image has its own generator, so the
    # files do not depend on which thread made them.
    workers = threads or min(4, os.cpu_count() or 1)
    if workers <= 1:
        return [one(i) for i in range(n)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))
