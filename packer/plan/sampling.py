"""Per-image random draws: sampled resolution (NaViT §3.2), token-drop rate (§3.1) and kept tokens.

Every draw is a pure function of ``(seed, epoch, stable image key)`` — never of iteration order,
partitioning or worker count — so a plan is identical across reruns and clusters.

How: each key is hashed to 64 bits with a byte-wise FNV-1a + splitmix64 finaliser computed in numpy
over all keys at once (stable across processes and machines, unlike Python's ``hash``); uniforms come
from a counter-based mixer of ``(seed, epoch, key hash, stream)`` (splitmix64 rounds), so planning a
million images is a handful of vectorised passes instead of a million generator constructions
(~80 µs each with ``PCG64(SeedSequence(...))``). Non-uniform draws use inverse CDFs tabulated once
per call on a fine grid (truncated normal, Beta), which needs nothing beyond numpy.

Which tokens are kept (:func:`kept_token_indices`) is needed per image at pack time only; it uses a
numpy ``Generator`` seeded from the same triple and keeps the first ``n_kept`` entries of one random
permutation, so a larger ``n_kept`` (exact-fill) always keeps a superset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from packer.config import PackConfig, ResolutionConfig, TokenDropConfig

# Independent random streams of one image (counter values of the mixer).
STREAM_RESOLUTION = 1
STREAM_DROP = 2
STREAM_JITTER = 3
STREAM_KEEP = 4

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_FNV_OFFSET = _U64(0xCBF29CE484222325)
_FNV_PRIME = _U64(0x100000001B3)
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_TABLE = 16_385  # grid points of the tabulated inverse CDFs (error << one patch)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic): a bijective avalanche mix."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def key_hash(keys: Sequence[str]) -> np.ndarray:
    """64-bit stable hashes (n,) uint64 of ``keys``: FNV-1a over their bytes, then splitmix64.

    The bytes are the UTF-8 encoding; a file name that is not valid UTF-8 (listed by Python with
    surrogate escapes) is hashed from its raw bytes (``surrogateescape``, as ``os.fsencode`` does on a
    UTF-8 system), so it plans like any other name and its hash does not depend on the locale.

    Vectorised across keys: one pass per byte column of the padded byte matrix, bytes beyond a key's
    length masked out, so a key's hash does not depend on the other keys in the call.
    """
    if len(keys) == 0:
        return np.zeros(0, dtype=_U64)
    raw = np.array([k.encode("utf-8", "surrogateescape") for k in keys], dtype=bytes)  # (n,) 'S<maxlen>'
    width = raw.dtype.itemsize
    mat = raw.view(np.uint8).reshape(len(keys), width)  # (n, maxlen) zero-padded
    lengths = np.char.str_len(raw)  # (n,) keys contain no NUL, so this is the byte length
    h = np.full(len(keys), _FNV_OFFSET, dtype=_U64)
    with np.errstate(over="ignore"):
        for j in range(width):
            live = lengths > j
            mixed = (h ^ mat[:, j].astype(_U64)) * _FNV_PRIME
            h = np.where(live, mixed, h)
    return _splitmix64(h ^ lengths.astype(_U64))


def _base_state(seed: int, epoch: int, khash: np.ndarray) -> np.ndarray:
    s = _splitmix64(np.array([seed & _MASK64], dtype=_U64))[0]
    e = _splitmix64(np.array([(epoch * 0xD1B54A32D192ED03 + 1) & _MASK64], dtype=_U64))[0]
    return _splitmix64(khash ^ s) ^ e


def uniforms(seed: int, epoch: int, khash: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats (n,) in the open interval (0, 1), one per image, for one ``stream``."""
    state = _base_state(seed, epoch, np.asarray(khash, dtype=_U64))
    with np.errstate(over="ignore"):
        x = _splitmix64(_splitmix64(state + _GOLDEN * _U64(stream)) + _GOLDEN)
    # Top 53 bits → (0, 1): +0.5 keeps both ends out (inverse CDFs are finite there).
    return ((x >> _U64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------------------------------
# Inverse CDFs (tabulated; numpy only)
# ----------------------------------------------------------------------------------------------------


def truncnormal_ppf(u: np.ndarray, mean: float, std: float, lo: float, hi: float) -> np.ndarray:
    """Inverse CDF of N(mean, std) truncated to [lo, hi], evaluated at ``u`` in (0, 1)."""
    x = np.linspace(lo, hi, _TABLE)
    pdf = np.exp(-0.5 * ((x - mean) / std) ** 2)
    cdf = np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) * 0.5 * np.diff(x))])
    if cdf[-1] <= 0:  # the window lies far in a tail: the density is ~exponential → nearest edge
        return np.full(np.shape(u), lo if mean < lo else hi, dtype=np.float64)
    return np.interp(u, cdf / cdf[-1], x)


def beta_ppf(u: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inverse CDF of Beta(a, b) at ``u`` in (0, 1); exact to ~1e-6 even where the density is
    singular (a < 1 or b < 1).

    The density is integrated in ``s = t**a`` on [0, 1/2] and ``r = (1 - t)**b`` on [1/2, 1], where
    the integrand is smooth: ``t**(a-1) dt = ds / a``.
    """
    half = 0.5
    s = np.linspace(0.0, half**a, _TABLE)
    t_lo = s ** (1.0 / a)  # increasing 0 → 1/2
    f_lo = (1.0 - t_lo) ** (b - 1.0) / a
    c_lo = np.concatenate([[0.0], np.cumsum((f_lo[1:] + f_lo[:-1]) * 0.5 * np.diff(s))])
    r = np.linspace(0.0, half**b, _TABLE)
    t_hi = 1.0 - r ** (1.0 / b)  # decreasing 1 → 1/2
    f_hi = (1.0 - r ** (1.0 / b)) ** (a - 1.0) / b
    c_hi = np.concatenate([[0.0], np.cumsum((f_hi[1:] + f_hi[:-1]) * 0.5 * np.diff(r))])  # from t=1
    total = c_lo[-1] + c_hi[-1]
    t = np.concatenate([t_lo, t_hi[::-1][1:]])
    cdf = np.concatenate([c_lo, (total - c_hi)[::-1][1:]]) / total
    return np.interp(u, cdf, t)


# ----------------------------------------------------------------------------------------------------
# Resolution (NaViT §3.2)
# ----------------------------------------------------------------------------------------------------


def sample_side(u: np.ndarray, res: ResolutionConfig) -> np.ndarray:
    """Sampled side length in pixels (n,) float from uniforms ``u`` (uniform / truncnormal kinds)."""
    if res.kind == "uniform":
        return res.lo + u * (res.hi - res.lo)
    if res.kind == "truncnormal":
        x = truncnormal_ppf(u, res.mean, res.std, -1.0, 1.0)  # N(mean, std) on [-1, 1]
        return res.lo + (x + 1.0) * 0.5 * (res.hi - res.lo)
    raise ValueError(f"sample_side: no side to sample for resolution kind {res.kind!r}")


def fit_grid(
    target_h: np.ndarray, target_w: np.ndarray, patch_size: int, token_cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Whole-patch grid (grid_h, grid_w) int32 (n,) closest to a target size in pixels, >= 1 patch
    per side and at most ``token_cap`` patches, shrinking uniformly (never cropping) when over."""
    fh = np.asarray(target_h, np.float64) / patch_size  # (n,) target size in patches
    fw = np.asarray(target_w, np.float64) / patch_size
    gh = np.maximum(1, np.floor(fh + 0.5)).astype(np.int64)
    gw = np.maximum(1, np.floor(fw + 0.5)).astype(np.int64)
    over = gh * gw > token_cap
    if over.any():
        # Scale both sides by sqrt(cap / area) and round down; an extreme aspect ratio pins the short
        # side at one patch and the long side is then limited to what the cap allows.
        f = np.sqrt(token_cap / (fh[over] * fw[over]))
        sh = np.clip(np.floor(fh[over] * f), 1, token_cap).astype(np.int64)
        sw = np.maximum(1, np.floor(fw[over] * f)).astype(np.int64)
        sw = np.minimum(sw, token_cap // sh)
        sh = np.minimum(sh, token_cap // sw)
        gh[over], gw[over] = sh, sw
    return gh.astype(np.int32), gw.astype(np.int32)


def sample_grids(
    orig_h: np.ndarray, orig_w: np.ndarray, khash: np.ndarray, cfg: PackConfig, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Planned patch grids (grid_h, grid_w) int32 (n,) of images with native size (orig_h, orig_w)."""
    res, pk = cfg.resolution, cfg.packing
    h = np.asarray(orig_h, np.float64)
    w = np.asarray(orig_w, np.float64)
    if res.kind == "native":
        scale = np.minimum(1.0, res.native_max_side / np.maximum(h, w))
    else:
        side = sample_side(uniforms(cfg.seed, epoch, khash, STREAM_RESOLUTION), res)
        ref = np.maximum(h, w) if res.side == "longest" else np.sqrt(h * w)
        scale = side / ref
        if not res.upsample:
            scale = np.minimum(scale, 1.0)
    return fit_grid(h * scale, w * scale, pk.patch_size, pk.token_cap)


# ----------------------------------------------------------------------------------------------------
# Token dropping (NaViT §3.1)
# ----------------------------------------------------------------------------------------------------


def sample_drop_rates(n_full: np.ndarray, khash: np.ndarray, cfg: PackConfig, epoch: int) -> np.ndarray:
    """Per-image drop rate d (n,) float64 in [0, 1)."""
    td: TokenDropConfig = cfg.token_drop
    n = len(n_full)
    if td.kind == "none":
        return np.zeros(n)
    if td.kind == "constant":
        return np.full(n, td.rate)
    if td.kind == "beta":
        a, b = td.mean * td.concentration, (1.0 - td.mean) * td.concentration
        return beta_ppf(uniforms(cfg.seed, epoch, khash, STREAM_DROP), a, b) * td.max
    # 'resolution': linear in the token count from min_rate (1 token) to max_rate (token_cap tokens),
    # plus N(0, jitter) truncated at two standard deviations.
    cap = cfg.packing.token_cap
    frac = (np.asarray(n_full, np.float64) - 1.0) / max(cap - 1, 1)
    rate = td.min_rate + (td.max_rate - td.min_rate) * np.clip(frac, 0.0, 1.0)
    if td.jitter > 0:
        z = truncnormal_ppf(uniforms(cfg.seed, epoch, khash, STREAM_JITTER), 0.0, 1.0, -2.0, 2.0)
        rate = rate + td.jitter * z
    return np.clip(rate, 0.0, np.nextafter(1.0, 0.0))


def kept_counts(n_full: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """kept = max(1, round(n_full · (1 − d))) (n,) int32, rounding halves up."""
    n = np.asarray(n_full, np.int64)
    kept = np.floor(n * (1.0 - np.asarray(rates, np.float64)) + 0.5).astype(np.int64)
    return np.clip(kept, 1, np.maximum(n, 1)).astype(np.int32)


def sample_sizes(
    orig_h: np.ndarray, orig_w: np.ndarray, keys: Sequence[str], cfg: PackConfig, epoch: int
) -> dict[str, np.ndarray]:
    """Everything the planner draws per image: grid_h, grid_w, n_full, n_kept (int32, (n,) each)."""
    khash = key_hash(keys)
    gh, gw = sample_grids(orig_h, orig_w, khash, cfg, epoch)
    n_full = gh.astype(np.int32) * gw
    n_kept = kept_counts(n_full, sample_drop_rates(n_full, khash, cfg, epoch))
    return {"grid_h": gh, "grid_w": gw, "n_full": n_full, "n_kept": n_kept}


def kept_token_indices(seed: int, epoch: int, key: str, n_full: int, n_kept: int) -> np.ndarray:
    """Sorted row-major token indices (n_kept,) int64 an image keeps out of ``n_full``.

    The first ``n_kept`` entries of one random permutation of the grid, from a generator seeded by
    (seed, epoch, key): a larger ``n_kept`` keeps a superset of a smaller one.
    """
    if not 0 <= n_kept <= n_full:
        raise ValueError(f"n_kept ({n_kept}) must be in [0, n_full={n_full}]")
    if n_kept == n_full:
        return np.arange(n_full, dtype=np.int64)
    h = int(key_hash([key])[0])
    ss = np.random.SeedSequence([seed & _MASK64, epoch & _MASK64, h, STREAM_KEEP])
    perm = np.random.Generator(np.random.PCG64(ss)).permutation(n_full)
    return np.sort(perm[:n_kept]).astype(np.int64)
