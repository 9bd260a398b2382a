"""Pack-time augmentation draws: a random-resized crop and a horizontal flip per image.

Drawn at *plan* time from header sizes, like the resolution and token-drop draws of
:mod:`packer.plan.sampling` and from the same counter-based uniforms of ``(seed, epoch, image key)``, so
the bin-packing plan already knows each crop's token count and shards stay byte-identical whatever
the worker count. Resolution sampling then treats the crop as the image (its size and aspect ratio
decide the patch grid); decoding (:mod:`packer.build.decode`) cuts the crop out of the upright source
image, resizes it to the planned grid, and flips the result.

The crop follows timm's NaFlex ``RandomResizedCropToSequence`` in spirit: its area is a fraction
``s`` of the image's, its aspect ratio ``r`` times the image's own (a native-aspect model should keep
seeing the aspect ratios of the data), ``log r`` uniform. A crop fits in the image iff
``s <= min(r, 1/r)`` (whatever the image's shape), so instead of torchvision's "10 attempts, then a
centre-crop fallback", ``(s, log r)`` is drawn *exactly* uniform on the part of the box
``[s_lo, s_hi] x [log r_lo, log r_hi]`` where the crop fits — the distribution those attempts sample
when they succeed — in one pass: ``log r`` from its marginal (a tabulated inverse CDF, as in
:mod:`packer.plan.sampling`), then ``s`` uniform given ``r``. Both configured ranges always hold (up to
rounding the box to whole pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from packer.config import AugmentConfig, PackConfig
from packer.plan.sampling import key_hash, uniforms

# Random streams of one image (counter values of packer.plan.sampling's mixer; 1-4 are used there).
STREAM_CROP_RATIO = 16
STREAM_CROP_SCALE = 17
STREAM_CROP_X = 18
STREAM_CROP_Y = 19
STREAM_FLIP = 20

_TABLE = 16_385  # grid points of the tabulated marginal of log r


@dataclass(frozen=True)
class Crops:
    """Per-image crop boxes and flips (n,) in *oriented* source pixels (after EXIF orientation):
    columns ``x0 <= x < x1``, rows ``y0 <= y < y1``; ``hflip`` mirrors the resized crop left-right."""

    x0: np.ndarray  # int32
    y0: np.ndarray  # int32
    x1: np.ndarray  # int32
    y1: np.ndarray  # int32
    hflip: np.ndarray  # bool

    @property
    def width(self) -> np.ndarray:
        return self.x1 - self.x0

    @property
    def height(self) -> np.ndarray:
        return self.y1 - self.y0

    @classmethod
    def whole(cls, orig_h: np.ndarray, orig_w: np.ndarray) -> Crops:
        """The identity: every image whole, nothing flipped."""
        n = len(orig_h)
        z = np.zeros(n, np.int32)
        return cls(z, z.copy(), np.asarray(orig_w, np.int32), np.asarray(orig_h, np.int32), np.zeros(n, bool))


def _fit_limit(log_r: np.ndarray, s_hi: float) -> np.ndarray:
    """Largest area fraction whose crop fits at ratio multiple e^log_r: min(s_hi, r, 1/r)."""
    return np.minimum(s_hi, np.exp(-np.abs(log_r)))


def sample_ratio_scale(
    u_ratio: np.ndarray, u_scale: np.ndarray, aug: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(area fraction s, ratio multiple r) (n,) float64 from uniforms: uniform on the region of
    ``[s_lo, s_hi] x [log r_lo, log r_hi]`` where the crop fits (s <= min(r, 1/r))."""
    s_lo, s_hi = aug.crop_scale
    a, b = np.log(aug.crop_ratio[0]), np.log(aug.crop_ratio[1])
    if b > a:
        t = np.linspace(a, b, _TABLE)
        if s_hi > s_lo:
            dens = np.maximum(_fit_limit(t, s_hi) - s_lo, 0.0)  # length of the feasible s-interval
        else:  # a single area: every feasible ratio equally likely
            dens = (_fit_limit(t, s_hi) >= s_lo).astype(np.float64)
        cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) * 0.5 * np.diff(t))])
        if cdf[-1] > 0:
            log_r = np.interp(u_ratio, cdf / cdf[-1], t)
        else:  # the feasible set is one point of the ratio range (validated non-empty): its edge
            log_r = np.full(np.shape(u_ratio), a if abs(a) < abs(b) else b)
    else:
        log_r = np.full(np.shape(u_ratio), a)
    hi = np.maximum(_fit_limit(log_r, s_hi), s_lo)  # == s_lo only at the very edge of feasibility
    s = s_lo + u_scale * (hi - s_lo)
    return s, np.exp(log_r)


def sample_crops(
    orig_h: np.ndarray, orig_w: np.ndarray, keys: Sequence[str], cfg: PackConfig, epoch: int
) -> Crops:
    """Every image's crop box and flip, drawn from (seed, epoch, key). Identity when augmentation is
    off (no draw made)."""
    aug = cfg.augment
    h = np.asarray(orig_h, np.int64)
    w = np.asarray(orig_w, np.int64)
    if not aug.active:
        return Crops.whole(h, w)
    khash = key_hash(keys)
    n = len(h)
    if aug.crops:
        s, r = sample_ratio_scale(
            uniforms(cfg.seed, epoch, khash, STREAM_CROP_RATIO),
            uniforms(cfg.seed, epoch, khash, STREAM_CROP_SCALE),
            aug,
        )
        # Crop sides: area s·W·H, aspect r·W/H → width W·sqrt(s·r), height H·sqrt(s/r); whole pixels.
        cw = np.clip(np.floor(w * np.sqrt(s * r) + 0.5), 1, w).astype(np.int64)
        ch = np.clip(np.floor(h * np.sqrt(s / r) + 0.5), 1, h).astype(np.int64)
        # Uniform position among the (W - cw + 1) x (H - ch + 1) placements.
        x0 = np.minimum(np.floor(uniforms(cfg.seed, epoch, khash, STREAM_CROP_X) * (w - cw + 1)), w - cw)
        y0 = np.minimum(np.floor(uniforms(cfg.seed, epoch, khash, STREAM_CROP_Y) * (h - ch + 1)), h - ch)
        x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    else:
        x0, y0, cw, ch = np.zeros(n, np.int64), np.zeros(n, np.int64), w, h
    if aug.hflip > 0:
        flip = uniforms(cfg.seed, epoch, khash, STREAM_FLIP) < aug.hflip
    else:
        flip = np.zeros(n, bool)
    return Crops(
        x0.astype(np.int32),
        y0.astype(np.int32),
        (x0 + cw).astype(np.int32),
        (y0 + ch).astype(np.int32),
        flip,
    )
