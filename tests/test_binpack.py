"""Bin packing: validity of every algorithm, equality with naive references, bounds, exact-fill."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packer.plan.binpack import ALGORITHMS, exact_fill, lower_bound, lp_bound, pack, pack_stats
from packer.plan.binpack_bfd import bfd_reference
from packer.plan.binpack_lp import solve_cutting_stock

FAST = settings(max_examples=60, deadline=None)


@st.composite
def instances(draw, max_n: int = 60, max_len: int = 48):
    seq_len = draw(st.integers(1, max_len))
    max_images = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, seq_len), min_size=0, max_size=max_n))
    return np.array(lengths, dtype=np.int64), seq_len, max_images


def assert_valid(lengths: np.ndarray, offsets: np.ndarray, members: np.ndarray, L: int, M: int) -> None:
    assert offsets.dtype == np.int64 and members.dtype == np.int64
    assert offsets[0] == 0 and offsets[-1] == len(members)
    # every index exactly once
    assert np.array_equal(np.sort(members), np.arange(len(lengths)))
    sizes = np.diff(offsets)
    assert (sizes >= 1).all() and (sizes <= M).all()
    for s in range(len(sizes)):
        assert lengths[members[offsets[s] : offsets[s + 1]]].sum() <= L


def naive_next_fit(lengths, L, M):
    bins, used, cnt = [], L + 1, M
    for i, x in enumerate(lengths.tolist()):
        if used + x > L or cnt == M:
            bins.append([])
            used = cnt = 0
        bins[-1].append(i)
        used += x
        cnt += 1
    return bins


def naive_first_fit(lengths, L, M):
    bins, caps = [], []
    for i, x in enumerate(lengths.tolist()):
        for b, c in enumerate(caps):
            if c >= x and len(bins[b]) < M:
                break
        else:
            b = len(bins)
            bins.append([])
            caps.append(L)
        bins[b].append(i)
        caps[b] -= x
    return bins


def to_lists(offsets, members):
    return [members[offsets[s] : offsets[s + 1]].tolist() for s in range(len(offsets) - 1)]


def brute_force_opt(lengths, L, M) -> int:
    """Fewest bins, by trying every assignment (tiny n only)."""
    n = len(lengths)
    for k in range(1, n + 1):
        for assign in itertools.product(range(k), repeat=n):
            if assign[0] != 0:
                continue
            caps, cnt = [0] * k, [0] * k
            for x, b in zip(lengths, assign, strict=True):
                caps[b] += x
                cnt[b] += 1
            if max(caps) <= L and max(cnt) <= M:
                return k
    return 0


@FAST
@given(inst=instances(), algo=st.sampled_from(ALGORITHMS), window=st.integers(1, 16), carry=st.integers(0, 4))
def test_every_algorithm_packs_validly_and_deterministically(inst, algo, window, carry):
    lengths, L, M = inst
    off, mem = pack(lengths, L, M, algo, stream_window=window, stream_open_bins=carry)
    assert_valid(lengths, off, mem, L, M)
    assert len(off) - 1 >= lower_bound(lengths, L, M)
    off2, mem2 = pack(lengths.copy(), L, M, algo, stream_window=window, stream_open_bins=carry)
    assert np.array_equal(off, off2) and np.array_equal(mem, mem2)


@FAST
@given(inst=instances())
def test_next_fit_and_first_fit_match_naive_references(inst):
    lengths, L, M = inst
    assert to_lists(*pack(lengths, L, M, "next-fit")) == naive_next_fit(lengths, L, M)
    assert to_lists(*pack(lengths, L, M, "first-fit")) == naive_first_fit(lengths, L, M)


@FAST
@given(inst=instances(max_n=80))
def test_grouped_bfd_equals_per_item_best_fit_decreasing(inst):
    lengths, L, M = inst
    off, mem = pack(lengths, L, M, "bfd")
    ref = bfd_reference(lengths, L, M, [], [], [])
    order = np.argsort(-lengths, kind="stable")
    expect: dict[int, list[int]] = {}
    for i, b in zip(order.tolist(), ref, strict=True):
        expect.setdefault(b, []).append(i)
    assert to_lists(off, mem) == [expect[b] for b in sorted(expect)]


def test_bfd_never_worse_than_next_fit_on_random_draws():
    rng = np.random.default_rng(1)
    for _ in range(20):
        L = int(rng.integers(16, 300))
        lengths = rng.integers(1, L + 1, size=int(rng.integers(50, 2000)))
        M = int(rng.integers(2, 20))
        s_bfd = len(pack(lengths, L, M, "bfd")[0])
        assert s_bfd <= len(pack(lengths, L, M, "next-fit")[0])
        assert s_bfd <= len(pack(lengths, L, M, "first-fit")[0])


@FAST
@given(inst=instances(), window=st.integers(1, 20))
def test_stream_with_one_window_is_bfd_and_without_carry_is_bfd_per_window(inst, window):
    lengths, L, M = inst
    n = len(lengths)
    bfd = pack(lengths, L, M, "bfd")
    one = pack(lengths, L, M, "stream", stream_window=max(n, 1), stream_open_bins=3)
    assert all(np.array_equal(a, b) for a, b in zip(bfd, one, strict=True))
    # No carry: each window is packed on its own, in order.
    off, mem = pack(lengths, L, M, "stream", stream_window=window, stream_open_bins=0)
    expect = []
    for s in range(0, n, window):
        o, m = pack(lengths[s : s + window], L, M, "bfd")
        expect += [[i + s for i in seq] for seq in to_lists(o, m)]
    assert to_lists(off, mem) == expect


def test_stream_carry_helps_and_flushes_everything():
    rng = np.random.default_rng(2)
    lengths = rng.integers(100, 700, size=3000)
    off0, _ = pack(lengths, 1024, 64, "stream", stream_window=100, stream_open_bins=0)
    off8, mem8 = pack(lengths, 1024, 64, "stream", stream_window=100, stream_open_bins=8)
    assert_valid(lengths, off8, mem8, 1024, 64)
    assert len(off8) < len(off0)


def test_histogram_beats_bfd_when_most_images_exceed_half_a_sequence():
    rng = np.random.default_rng(3)
    L = 256
    lengths = np.concatenate([rng.integers(129, 200, 400), rng.integers(20, 128, 600)])
    rng.shuffle(lengths)
    off_h, mem_h = pack(lengths, L, 64, "histogram")
    assert_valid(lengths, off_h, mem_h, L, 64)
    s_h, s_b = len(off_h) - 1, len(pack(lengths, L, 64, "bfd")[0]) - 1
    assert s_h <= s_b
    assert s_h >= np.ceil(lp_bound(lengths, L) - 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(2, 20),
    M=st.integers(1, 4),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=6),
)
def test_lp_bound_is_a_bound_between_sum_bound_and_optimum(L, M, lengths):
    lengths = np.minimum(np.array(lengths), L)
    opt = brute_force_opt(lengths.tolist(), L, M)
    lp = lp_bound(lengths, L, M)
    assert lp >= lengths.sum() / L - 1e-9
    assert lp >= len(lengths) / M - 1e-9
    assert np.ceil(lp - 1e-6) <= opt
    assert lp <= len(pack(lengths, L, M, "bfd")[0]) - 1 + 1e-9


def test_lp_bound_equals_brute_force_optimum_on_tight_cases():
    # Every item > L/2: no two share a sequence, the LP sees it (sum bound does not).
    big = np.array([11, 12, 13, 17, 19])
    assert abs(lp_bound(big, 20) - brute_force_opt(big.tolist(), 20, 8)) < 1e-6
    assert lower_bound(big, 20) < brute_force_opt(big.tolist(), 20, 8)
    # Two sizes whose LP optimum is integral: 4 x 7 and 4 x 3 in L=10 pair up perfectly.
    pair = np.array([7, 3, 7, 3, 7, 3, 7, 3])
    assert abs(lp_bound(pair, 10) - brute_force_opt(pair.tolist(), 10, 8)) < 1e-6
    # Image cap binds: 1-token images, at most 2 per sequence.
    ones = np.ones(7, dtype=np.int64)
    assert abs(lp_bound(ones, 100, 2) - 3.5) < 1e-6
    assert brute_force_opt(ones.tolist(), 100, 2) == 4


def test_cutting_stock_primal_is_feasible():
    rng = np.random.default_rng(4)
    vals = np.unique(rng.integers(30, 200, 40))[::-1]
    demand = rng.integers(1, 50, len(vals))
    lp = solve_cutting_stock(vals, demand, 256, 6)
    assert lp.optimal
    assert (lp.patterns @ vals <= 256).all() and (lp.patterns.sum(1) <= 6).all()
    assert (lp.patterns.T @ lp.x >= demand - 1e-6).all()
    assert abs(lp.x.sum() - lp.bound) < 1e-6


@FAST
@given(inst=instances(), seed=st.integers(0, 2**16))
def test_exact_fill_restores_dropped_tokens_within_limits(inst, seed):
    kept, L, M = inst
    rng = np.random.default_rng(seed)
    full = kept + rng.integers(0, L, size=len(kept))  # dropped tokens available to keep back
    off, mem = pack(kept, L, M, "bfd")
    new = exact_fill(off, mem, kept.astype(np.int32), full.astype(np.int32), L)
    assert new.dtype == np.int32
    assert (new >= kept).all() and (new <= full).all()
    for s in range(len(off) - 1):
        seq = mem[off[s] : off[s + 1]]
        # the gap closes completely unless the sequence runs out of dropped tokens
        assert new[seq].sum() == min(L, full[seq].sum())
    assert pack_stats(new, off, L).padding_tokens <= pack_stats(kept, off, L).padding_tokens


def test_exact_fill_spreads_in_proportion_to_drops():
    off = np.array([0, 2])
    mem = np.array([0, 1])
    new = exact_fill(off, mem, np.array([10, 10]), np.array([40, 20]), 30)
    # gap 10 split 30:10 like the drops -> 7.5 / 2.5; floors 7 / 2, equal remainders -> earlier image
    assert new.tolist() == [18, 12]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown packing algorithm"):
        pack(np.array([1, 2]), 8, 4, "worst-fit")
    with pytest.raises(ValueError, match=r"in \[1, 8\]"):
        pack(np.array([1, 9]), 8, 4)
    with pytest.raises(ValueError, match=r"in \[1, 8\]"):
        pack(np.array([0, 2]), 8, 4)
    off, mem = pack(np.zeros(0, dtype=np.int64), 8, 4)
    assert off.tolist() == [0] and len(mem) == 0
