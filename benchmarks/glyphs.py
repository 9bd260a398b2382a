"""A procedurally generated 10-class, 28x28 grayscale digit set: the learning-speed yardstick's data.

Only package registries are reachable from the development machine, so no public digit/fashion set
can be downloaded. This renders the digits 0-9 with Pillow's built-in scalable font and distorts
each one (size, stroke width, rotation, shear, anisotropic scale, shift, blur, pixel noise, a few
clutter strokes), which gives an MNIST-like task: a linear classifier on raw pixels gets most of
it, a small ViT needs a few hundred steps. Fully determined by ``seed`` (numpy's PCG64 plus Pillow's
bundled font), so every benchmark run and test sees the same pixels.

    from glyphs import glyph_digits
    x_train, y_train, x_test, y_test = glyph_digits(10_000, 2_000, seed=0)  # uint8 (N, 28, 28)
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIDE = 28  # output side in pixels
_CANVAS = 64  # glyphs are drawn and distorted at this size, then downsampled (anti-aliased)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_glyph(label: int, rng: np.random.Generator, difficulty: float = 1.0) -> np.ndarray:
    """(28, 28) uint8: digit ``label`` (light on dark) under a random distortion scaled by ``difficulty``."""
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    size = int(rng.integers(30, 44))
    stroke = int(rng.integers(0, 4))
    ink = int(rng.integers(170, 256))
    draw.text(
        (_CANVAS / 2, _CANVAS / 2),
        str(label),
        fill=ink,
        font=_font(size),
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=ink,
    )
    # Clutter: short random strokes, so that not every bright pixel belongs to the digit.
    for _ in range(int(rng.integers(0, 1 + round(3 * difficulty)))):
        x0, y0 = rng.uniform(0, _CANVAS, 2)
        dx, dy = rng.uniform(-10, 10, 2)
        draw.line((x0, y0, x0 + dx, y0 + dy), fill=int(rng.integers(80, 200)), width=int(rng.integers(1, 4)))
    # Random affine about the centre: rotation, shear, anisotropic scale, shift (inverse map for PIL).
    d = difficulty
    ang = np.deg2rad(rng.uniform(-18, 18) * d)
    shear = rng.uniform(-0.3, 0.3) * d
    sx, sy = np.exp(rng.uniform(-0.2, 0.2, 2) * d)
    tx, ty = rng.uniform(-6, 6, 2) * d
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    fwd = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])  # output = fwd @ input
    inv = np.linalg.inv(fwd)
    c = _CANVAS / 2
    off = np.array([c, c]) - inv @ np.array([c + tx, c + ty])
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    blur = rng.uniform(0.0, 1.5 * d)
    if blur > 0.2:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    small = np.asarray(canvas.resize((SIDE, SIDE), Image.Resampling.LANCZOS), dtype=np.float32)
    small = small + rng.normal(0, 20 * d, small.shape) + rng.uniform(0, 40 * d)  # noise + background level
    return np.clip(small, 0, 255).astype(np.uint8)


def glyph_digits(
    n_train: int, n_test: int, seed: int = 0, difficulty: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: uint8 (N, 28, 28) images, int64 (N,) labels 0-9.

    Labels are balanced (``i % 10``) and then shuffled; train and test images are disjoint draws of
    the same distribution (the test set uses an independent stream of the same seed)."""
    out = []
    for part, n in ((0, n_train), (1, n_test)):
        rng = np.random.default_rng([seed, part])
        labels = rng.permutation(np.arange(n) % 10)
        images = (
            np.stack([render_glyph(int(y), rng, difficulty) for y in labels])
            if n
            else np.zeros((0, SIDE, SIDE), np.uint8)
        )
        out += [images, labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]
