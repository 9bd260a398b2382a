"""Per-image draws: bounds, aspect ratio, token cap, extreme aspect, determinism, kept-token superset."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packer.config import PackConfig
from packer.plan.sampling import (
    beta_ppf,
    fit_grid,
    kept_token_indices,
    key_hash,
    sample_sizes,
    truncnormal_ppf,
    uniforms,
)


def _cfg(**sections) -> PackConfig:
    return PackConfig.model_validate(sections)


def _keys(n: int) -> list[str]:
    return [f"c{i % 5}/img_{i:05d}.jpg" for i in range(n)]


def _sizes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(8, 3000, n), rng.integers(8, 3000, n)


def test_key_hash_is_stable_across_processes_and_independent_of_batch() -> None:
    keys = ["a/b.jpg", "ünïcödé/ß.png", "x" * 300, "", "a/b.jpg "]
    h = key_hash(keys)
    assert len(set(h.tolist())) == len(keys)
    for i, k in enumerate(keys):
        assert key_hash([k])[0] == h[i]  # no dependence on the other keys (padding width)
    code = f"from packer.plan.sampling import key_hash; print(key_hash({keys!r}).tolist())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    ).stdout
    assert eval(out) == h.tolist()


def test_uniforms_are_uniform_and_streams_independent() -> None:
    h = key_hash(_keys(20_000))
    u1, u2 = uniforms(7, 0, h, 1), uniforms(7, 0, h, 2)
    assert u1.min() > 0 and u1.max() < 1
    assert abs(u1.mean() - 0.5) < 0.01 and abs(u1.var() - 1 / 12) < 0.003
    assert abs(np.corrcoef(u1, u2)[0, 1]) < 0.03
    assert abs(np.corrcoef(u1, uniforms(7, 1, h, 1))[0, 1]) < 0.03  # another epoch: fresh draws
    assert not np.array_equal(u1, uniforms(8, 0, h, 1))


def test_inverse_cdfs_match_their_moments() -> None:
    u = (np.arange(200_000) + 0.5) / 200_000
    x = truncnormal_ppf(u, -0.5, 1.0, -1.0, 1.0)
    # Mean of N(mu, 1) truncated to [a, b]: mu + (phi(a-mu) - phi(b-mu)) / (Phi(b-mu) - Phi(a-mu)).
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expect = -0.5 + (phi(-0.5) - phi(1.5)) / (Phi(1.5) - Phi(-0.5))
    assert abs(x.mean() - expect) < 1e-3 and x.min() >= -1 and x.max() <= 1
    for a, b in ((1.0, 3.0), (0.3, 0.7), (5.0, 2.0)):
        y = beta_ppf(u, a, b)
        assert abs(y.mean() - a / (a + b)) < 2e-3
        assert abs(y.var() - a * b / ((a + b) ** 2 * (a + b + 1))) < 2e-3


@pytest.mark.parametrize("kind", ["uniform", "truncnormal"])
@pytest.mark.parametrize("side", ["longest", "area"])
def test_sampled_sizes_within_bounds_and_aspect(kind: str, side: str) -> None:
    lo, hi, p = 64, 384, 16
    cfg = _cfg(resolution={"kind": kind, "lo": lo, "hi": hi, "side": side}, packing={"seq_len": 4096})
    oh, ow = _sizes(5000)
    s = sample_sizes(oh, ow, _keys(5000), cfg, 0)
    gh, gw = s["grid_h"].astype(float), s["grid_w"].astype(float)
    assert (gh >= 1).all() and (gw >= 1).all()
    assert (s["n_full"] == s["grid_h"] * s["grid_w"]).all() and (s["n_full"] <= 4096).all()
    measured = np.maximum(gh, gw) * p if side == "longest" else np.sqrt(gh * gw) * p
    # Rounding each side to whole patches moves a side by at most half a patch (both sides for 'area').
    assert measured.min() >= lo - p and measured.max() <= hi + p
    # Aspect ratio kept to within one patch of rounding on each side: |gw/gh - w/h| from ±1/2 patch.
    clamped = (gh == 1) | (gw == 1)
    ok = np.abs(gw * oh - gh * ow) <= 0.5 * (oh + ow) + 1e-9
    assert ok[~clamped].all()


def test_native_keeps_size_and_caps_longest_side() -> None:
    cfg = _cfg(
        resolution={"kind": "native", "native_max_side": 512}, packing={"seq_len": 1 << 16, "patch_size": 16}
    )
    oh, ow = np.array([160, 1024, 40, 3]), np.array([320, 256, 4000, 5])
    s = sample_sizes(oh, ow, _keys(4), cfg, 0)
    assert s["grid_h"].tolist() == [10, 32, 1, 1]
    assert s["grid_w"].tolist() == [20, 8, 32, 1]


def test_upsample_false_never_exceeds_native() -> None:
    cfg = _cfg(
        resolution={"kind": "uniform", "lo": 256, "hi": 512, "upsample": False}, packing={"patch_size": 16}
    )
    oh, ow = np.full(500, 100), np.full(500, 200)
    s = sample_sizes(oh, ow, _keys(500), cfg, 0)
    assert (s["grid_w"] * 16 <= 200 + 8).all() and (s["grid_h"] * 16 <= 100 + 8).all()


@settings(max_examples=300, deadline=None)
@given(
    th=st.floats(0.1, 1e5),
    tw=st.floats(0.1, 1e5),
    p=st.integers(1, 64),
    cap=st.integers(1, 5000),
)
def test_fit_grid_respects_cap_and_minimum(th: float, tw: float, p: int, cap: int) -> None:
    gh, gw = fit_grid(np.array([th]), np.array([tw]), p, cap)
    gh, gw = int(gh[0]), int(gw[0])
    assert gh >= 1 and gw >= 1 and gh * gw <= cap
    if round(th / p) * round(tw / p) <= cap and th / p >= 1 and tw / p >= 1:
        assert abs(gh - th / p) <= 0.5 + 1e-9 and abs(gw - tw / p) <= 0.5 + 1e-9  # not capped: nearest
    elif gh > 1 and gw > 1:
        # Shrunk, not cropped: the aspect ratio stays within one patch per side.
        assert abs(gw * th - gh * tw) <= th + tw


def test_extreme_aspect_ratio_gives_a_valid_grid() -> None:
    cfg = _cfg(resolution={"kind": "uniform", "lo": 64, "hi": 384}, packing={"seq_len": 64, "patch_size": 16})
    oh, ow = np.array([10, 5000, 20, 1]), np.array([500, 100, 20_000, 1])  # 1:50, 50:1, 1:1000, 1x1
    s = sample_sizes(oh, ow, _keys(4), cfg, 0)
    assert (s["grid_h"] >= 1).all() and (s["grid_w"] >= 1).all() and (s["n_full"] <= 64).all()
    assert s["grid_h"][0] == 1 and s["grid_w"][1] == 1 and s["grid_h"][2] == 1


def test_draws_depend_on_key_not_on_order() -> None:
    cfg = _cfg(token_drop={"kind": "beta", "mean": 0.3, "max": 0.6})
    keys = _keys(3000)
    oh, ow = _sizes(3000)
    a = sample_sizes(oh, ow, keys, cfg, 2)
    perm = np.random.default_rng(1).permutation(3000)
    b = sample_sizes(oh[perm], ow[perm], [keys[i] for i in perm], cfg, 2)
    for k in a:
        np.testing.assert_array_equal(a[k][perm], b[k], err_msg=k)
    c = sample_sizes(oh, ow, keys, cfg, 3)
    assert not np.array_equal(a["grid_h"], c["grid_h"])  # a new epoch redraws


@pytest.mark.parametrize(
    "drop",
    [
        {"kind": "none"},
        {"kind": "constant", "rate": 0.4},
        {"kind": "beta", "mean": 0.25, "max": 0.5},
        {"kind": "resolution", "min_rate": 0.1, "max_rate": 0.6, "jitter": 0.05},
    ],
)
def test_token_drop_rates(drop: dict) -> None:
    cfg = _cfg(token_drop=drop, packing={"seq_len": 1024})
    n = 20_000
    oh, ow = _sizes(n, seed=3)
    s = sample_sizes(oh, ow, _keys(n), cfg, 0)
    full, kept = s["n_full"].astype(np.int64), s["n_kept"].astype(np.int64)
    assert (kept >= 1).all() and (kept <= full).all()
    d = 1 - kept / full
    big = full >= 100  # rounding to whole tokens blurs the rate of tiny images
    if drop["kind"] == "none":
        assert (kept == full).all()
    elif drop["kind"] == "constant":
        assert (kept == np.maximum(1, np.floor(full * 0.6 + 0.5))).all()
    elif drop["kind"] == "beta":
        assert d.max() <= 0.5 + 1e-9 and abs(d[big].mean() - 0.125) < 0.01
    else:
        # Grows with the token count: the mean rate of large images exceeds that of small ones.
        assert d[full > 400].mean() > d[(full > 50) & (full < 150)].mean() + 0.08
        assert d[big].min() >= 0.1 - 2 * 0.05 - 0.01 and d.max() <= 0.6 + 2 * 0.05 + 1e-9


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 1000),
    key=st.text(max_size=40),
    n_full=st.integers(1, 600),
    data=st.data(),
)
def test_kept_indices_are_sorted_unique_and_nested(
    seed: int, epoch: int, key: str, n_full: int, data
) -> None:
    small = data.draw(st.integers(1, n_full))
    large = data.draw(st.integers(small, n_full))
    a = kept_token_indices(seed, epoch, key, n_full, small)
    b = kept_token_indices(seed, epoch, key, n_full, large)
    assert a.dtype == np.int64 and len(a) == small and len(b) == large
    assert (np.diff(a) > 0).all() and a[0] >= 0 and a[-1] < n_full
    assert np.isin(a, b).all()  # exact-fill keeps a superset
    np.testing.assert_array_equal(a, kept_token_indices(seed, epoch, key, n_full, small))
