"""Bin packing of images (known token lengths) into fixed-length sequences. Pure numpy, no I/O.

Owns the planner's packing algorithms and bounds; :mod:`packer.plan.planner` calls :func:`pack`, optionally
:func:`exact_fill`, and reports against :func:`lower_bound` / :func:`lp_bound`.

Algorithms (``ALGORITHMS``), all capped at ``max_images`` images per sequence:

* ``next-fit``  — one open sequence in arrival order; a new one when the image does not fit. The
  baseline (vit-pytorch's na_vit packs this way).
* ``first-fit`` — arrival order, each image into the earliest sequence it fits (the NaViT paper's
  description); a max segment tree over sequences' remaining capacity answers "leftmost >= x".
* ``bfd``       — best-fit decreasing (default); see :mod:`packer.plan.binpack_bfd` for the
  capacity-keyed, length-grouped implementation.
* ``histogram`` — cutting-stock LP over the length histogram (:mod:`packer.plan.binpack_lp`), its
  patterns rounded down and filled with images, repeated on the residue, the rest best-fit.
  Near-optimal when many images exceed half a sequence (where BFD's greedy loses most).
* ``stream``    — bounded look-ahead for a live pipeline: BFD over each window of
  ``stream_window`` images, carrying the ``stream_open_bins`` emptiest sequences into the next window;
  everything still open is flushed at the end. Sequences come out in the order they are closed.

Output is CSR: sequence ``s`` holds ``seq_members[seq_offsets[s]:seq_offsets[s+1]]`` (indices into
``lengths``) in layout order. Every algorithm is deterministic: ties are broken by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packer.plan.binpack_bfd import bfd_groups
from packer.plan.binpack_lp import solve_cutting_stock

ALGORITHMS = ("next-fit", "first-fit", "bfd", "histogram", "stream")

# Rounds of "solve the LP on what is left, take whole patterns" before best-fit mops up the rest.
_HISTOGRAM_ROUNDS = 3


@dataclass(frozen=True)
class PackStats:
    """Minimal summary of one packing (the full report lives in :mod:`packer.analysis.report`)."""

    sequences: int
    real_tokens: int
    padding_tokens: int
    padding_fraction: float


def pack_stats(lengths: np.ndarray, seq_offsets: np.ndarray, seq_len: int) -> PackStats:
    """Sequences, real/padding tokens and padding fraction of a packing of ``lengths`` (n,)."""
    s = len(seq_offsets) - 1
    real = int(np.asarray(lengths, dtype=np.int64).sum())
    total = s * int(seq_len)
    return PackStats(s, real, total - real, (total - real) / total if total else 0.0)


def lower_bound(lengths: np.ndarray, seq_len: int, max_images: int | None = None) -> int:
    """``ceil(sum(lengths) / seq_len)`` (and at least ``ceil(n / max_images)`` when given)."""
    total = int(np.asarray(lengths, dtype=np.int64).sum())
    lb = -(-total // int(seq_len))
    if max_images is not None:
        lb = max(lb, -(-len(lengths) // int(max_images)))
    return lb


def lp_bound(lengths: np.ndarray, seq_len: int, max_images: int | None = None) -> float:
    """Cutting-stock LP lower bound on the number of sequences (Gilmore–Gomory column generation).

    Always a valid bound, at least ``sum / seq_len``; ``ceil`` of it is an integer bound. With
    ``max_images`` the patterns also respect the image cap (tighter, slower when the cap binds).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0.0
    if lengths.min() < 1 or lengths.max() > seq_len:
        raise ValueError(f"image lengths must be in [1, {seq_len}]")
    vals, counts = np.unique(lengths, return_counts=True)
    vals, counts = vals[::-1], counts[::-1]
    cap = int(max_images) if max_images is not None else int(seq_len)  # seq_len items of >= 1 token
    seeds, _ = _bfd_patterns(vals, counts, int(seq_len), cap)
    return solve_cutting_stock(vals, counts, int(seq_len), cap, seed_patterns=seeds).bound


def _bfd_patterns(
    vals: np.ndarray, counts: np.ndarray, L: int, M: int, limit: int = 2000
) -> tuple[np.ndarray, float]:
    """Distinct patterns (K, m) of a best-fit-decreasing packing of the histogram (vals descending),
    the ``limit`` most frequent first (a good, cheap starting pool for column generation), and that
    packing's mean padding tokens per sequence."""
    bins, q = bfd_groups(vals, counts, L, M, [], [], [])
    n_bins = max(bins) + 1
    mean_waste = (n_bins * L - float(vals @ counts)) / n_bins
    item_bin = np.repeat(np.array(bins, dtype=np.int64), q)  # (n,) in sorted order
    group = np.repeat(np.arange(len(vals), dtype=np.int32), counts)  # (n,) length index
    order = np.lexsort((group, item_bin))
    g, b = group[order], item_bin[order]
    cuts = np.flatnonzero(np.r_[True, b[1:] != b[:-1], True])
    freq: dict[bytes, int] = {}
    raw = g.tobytes()
    for s0, s1 in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        key = raw[4 * s0 : 4 * s1]  # a bin's sorted length indices identify its pattern
        freq[key] = freq.get(key, 0) + 1
    keys = sorted(freq, key=lambda k: (-freq[k], k))[:limit]
    out = np.zeros((len(keys), len(vals)), dtype=np.int64)
    for i, k in enumerate(keys):
        np.add.at(out[i], np.frombuffer(k, dtype=np.int32), 1)
    return out, mean_waste


def pack(
    lengths: np.ndarray,
    seq_len: int,
    max_images: int,
    algorithm: str = "bfd",
    *,
    stream_window: int = 4096,
    stream_open_bins: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Pack images of ``lengths`` (n,) tokens (each 1..seq_len, arrival order) into sequences.

    Returns CSR ``(seq_offsets (S+1,) int64, seq_members (n,) int64)``: every index exactly once,
    each sequence's token sum <= ``seq_len`` and member count <= ``max_images``. Deterministic.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (len(lengths) and not np.issubdtype(lengths.dtype, np.integer)):
        raise ValueError(f"lengths must be a 1-D integer array, got {lengths.dtype} {lengths.shape}")
    lengths = lengths.astype(np.int64, copy=False)
    seq_len, max_images = int(seq_len), int(max_images)
    if seq_len < 1 or max_images < 1:
        raise ValueError(f"seq_len ({seq_len}) and max_images ({max_images}) must be >= 1")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > seq_len):
        raise ValueError(
            f"image lengths must be in [1, {seq_len}], got [{int(lengths.min())}, {int(lengths.max())}]"
        )
    if len(lengths) == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if algorithm == "next-fit":
        return _next_fit(lengths, seq_len, max_images)
    if algorithm == "first-fit":
        return _first_fit(lengths, seq_len, max_images)
    if algorithm == "bfd":
        return _bfd(lengths, seq_len, max_images)
    if algorithm == "histogram":
        return _histogram(lengths, seq_len, max_images)
    if algorithm == "stream":
        if stream_window < 1 or stream_open_bins < 0:
            raise ValueError("stream_window must be >= 1 and stream_open_bins >= 0")
        return _stream(lengths, seq_len, max_images, int(stream_window), int(stream_open_bins))
    raise ValueError(f"unknown packing algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")


def _csr(item_bin: np.ndarray, items: np.ndarray, bin_rank: np.ndarray | None = None) -> tuple:
    """CSR from placements in placement order: ``items[k]`` went into bin ``item_bin[k]``.

    Sequences are numbered by ``bin_rank[bin]`` (default: bin id, empty bins dropped); members keep
    placement order within a sequence.
    """
    item_bin = np.asarray(item_bin, dtype=np.int64)
    if bin_rank is None:
        used = np.zeros(int(item_bin.max()) + 1, dtype=bool)
        used[item_bin] = True
        bin_rank = np.cumsum(used) - 1
    seq = bin_rank[item_bin]  # (n,)
    order = np.argsort(seq, kind="stable")
    counts = np.bincount(seq, minlength=int(seq.max()) + 1)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, np.asarray(items, dtype=np.int64)[order]


def _next_fit(lengths: np.ndarray, L: int, M: int) -> tuple[np.ndarray, np.ndarray]:
    item_bin = [0] * len(lengths)
    b = used = cnt = 0
    for i, x in enumerate(lengths.tolist()):
        if used + x > L or cnt == M:
            b += 1
            used = cnt = 0
        used += x
        cnt += 1
        item_bin[i] = b
    return _csr(np.array(item_bin), np.arange(len(lengths)))


def _first_fit(lengths: np.ndarray, L: int, M: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(lengths)
    P = 1 << max(0, (n - 1).bit_length())  # leaves = candidate bins; at most n are ever opened
    # tree[v]: max remaining capacity in v's subtree (leaf: -1 once the bin has no image slot left).
    # Unopened bins sit at capacity L, so "leftmost leaf >= x" also opens the next new bin.
    tree = [L] * (2 * P)
    room = [M] * P
    item_bin = [0] * n
    for i, x in enumerate(lengths.tolist()):
        v = 1
        while v < P:
            v <<= 1
            if tree[v] < x:
                v += 1
        b = v - P
        item_bin[i] = b
        room[b] -= 1
        tree[v] = tree[v] - x if room[b] else -1
        v >>= 1
        while v:
            t = tree[2 * v] if tree[2 * v] > tree[2 * v + 1] else tree[2 * v + 1]
            if tree[v] == t:
                break
            tree[v] = t
            v >>= 1
    return _csr(np.array(item_bin), np.arange(n))


def _sorted_groups(lengths: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items ``idx`` sorted by (length desc, index asc) and their distinct lengths / counts."""
    ls = lengths[idx]
    order = np.argsort(-ls, kind="stable")
    items = idx[order]
    sl = ls[order]
    starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
    counts = np.diff(np.r_[starts, len(sl)])
    return items, sl[starts], counts


def _bfd(lengths: np.ndarray, L: int, M: int) -> tuple[np.ndarray, np.ndarray]:
    items, vals, counts = _sorted_groups(lengths, np.arange(len(lengths)))
    bins, q = bfd_groups(vals, counts, L, M, [], [], [])
    return _csr(np.repeat(np.array(bins, dtype=np.int64), q), items)


def _histogram(lengths: np.ndarray, L: int, M: int) -> tuple[np.ndarray, np.ndarray]:
    items, vals, counts = _sorted_groups(lengths, np.arange(len(lengths)))
    starts = np.r_[0, np.cumsum(counts)[:-1]]  # (m,) first sorted position of each length
    taken = np.zeros(len(vals), dtype=np.int64)  # (m,) items of each length already placed
    chunk_bins: list[np.ndarray] = []
    chunk_items: list[np.ndarray] = []
    n_bins = 0
    for _ in range(_HISTOGRAM_ROUNDS):
        left = counts - taken
        act = np.flatnonzero(left > 0)
        if len(act) == 0:
            break
        seeds, bfd_waste = _bfd_patterns(vals[act], left[act], L, M)
        # Pivot budget: converge fully for small histograms; with ~1000 distinct lengths each pivot
        # costs O(m^2), so stop early and let best fit handle what the rounded patterns leave.
        m = len(act)
        budget = min(50 * m + 500, 400_000_000 // (m * m) + 200)
        lp = solve_cutting_stock(vals[act], left[act], L, M, seed_patterns=seeds, max_iter=budget)
        copies = np.floor(lp.x + 1e-7).astype(np.int64)  # whole patterns only; the rest goes on
        if not lp.optimal:
            # Out of pivots: the basis may still hold poor starting patterns. Keep only patterns that
            # waste no more than best fit does on average, so rounding never does worse than BFD.
            copies[L - lp.patterns @ vals[act] > bfd_waste] = 0
        if copies.sum() == 0:
            break
        # Deterministic pattern order: as returned (basis order), each copied `copies[p]` times.
        for p in np.flatnonzero(copies).tolist():
            f = int(copies[p])
            for j in np.flatnonzero(lp.patterns[p]).tolist():
                g = int(act[j])
                a = int(lp.patterns[p, j])
                k = min(f * a, int(counts[g] - taken[g]))  # slots beyond supply stay empty
                if k <= 0:
                    continue
                chunk_bins.append(n_bins + np.repeat(np.arange(f), a)[:k])
                s0 = int(starts[g] + taken[g])
                chunk_items.append(items[s0 : s0 + k])
                taken[g] += k
            n_bins += f
    # Remaining capacity / image slots of the pattern bins, then best fit for what is left.
    if chunk_bins:
        pb = np.concatenate(chunk_bins)
        pi = np.concatenate(chunk_items)
    else:
        pb = np.zeros(0, dtype=np.int64)
        pi = np.zeros(0, dtype=np.int64)
    cap = (L - np.bincount(pb, weights=lengths[pi], minlength=n_bins).astype(np.int64)).tolist()
    room = (M - np.bincount(pb, minlength=n_bins)).tolist()
    left = counts - taken
    rest = np.flatnonzero(left > 0)
    if len(rest):
        # Residual items: the un-taken tail of each length's run in sorted order.
        res_items = np.concatenate([items[starts[g] + taken[g] : starts[g] + counts[g]] for g in rest])
        bins, q = bfd_groups(vals[rest], left[rest], L, M, cap, room, list(range(n_bins)))
        pb = np.concatenate([pb, np.repeat(np.array(bins, dtype=np.int64), q)])
        pi = np.concatenate([pi, res_items])
    return _csr(pb, pi)


def _stream(lengths: np.ndarray, L: int, M: int, window: int, carry: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(lengths)
    cap: list[int] = []
    room: list[int] = []
    carried: list[int] = []
    closed: list[int] = []  # bins in the order they are emitted
    chunk_bins: list[np.ndarray] = []
    chunk_items: list[np.ndarray] = []
    for start in range(0, n, window):
        idx = np.arange(start, min(n, start + window))
        items, vals, counts = _sorted_groups(lengths, idx)
        first_new = len(cap)
        bins, q = bfd_groups(vals, counts, L, M, cap, room, carried)
        chunk_bins.append(np.repeat(np.array(bins, dtype=np.int64), q))
        chunk_items.append(items)
        cand = np.array(carried + list(range(first_new, len(cap))), dtype=np.int64)
        cand.sort()
        if start + window >= n or carry == 0:
            keep = np.zeros(0, dtype=np.int64)
        else:
            c_cap = np.array(cap, dtype=np.int64)[cand]
            c_room = np.array(room, dtype=np.int64)[cand]
            usable = np.flatnonzero((c_room > 0) & (c_cap > 0))
            # The emptiest sequences have the most to gain from the next window; ties: lowest id.
            pick = usable[np.lexsort((cand[usable], -c_cap[usable]))][:carry]
            keep = np.sort(cand[pick])
        closed.extend(np.setdiff1d(cand, keep, assume_unique=True).tolist())
        carried = keep.tolist()
    rank = np.empty(len(cap), dtype=np.int64)
    rank[np.array(closed, dtype=np.int64)] = np.arange(len(closed))
    return _csr(np.concatenate(chunk_bins), np.concatenate(chunk_items), rank)


def exact_fill(
    seq_offsets: np.ndarray,
    seq_members: np.ndarray,
    n_kept: np.ndarray,
    n_full: np.ndarray,
    seq_len: int,
) -> np.ndarray:
    """Close each sequence's padding gap by keeping back dropped tokens of images already in it.

    The gap ``seq_len - sum(n_kept)`` is spread over the sequence's images in proportion to their
    dropped tokens ``n_full - n_kept`` (integer floor, then one token each to the largest remainders,
    ties by layout position), so drop rates stay as even as the integers allow. Returns a new n_kept
    (same dtype); never above ``n_full`` or a sequence total above ``seq_len``, never below the input.
    """
    offsets = np.asarray(seq_offsets, dtype=np.int64)
    members = np.asarray(seq_members, dtype=np.int64)
    out = np.array(n_kept, copy=True)
    if len(members) == 0:
        return out
    S = len(offsets) - 1
    seq_of = np.repeat(np.arange(S), np.diff(offsets))  # (n_members,)
    kept = out[members].astype(np.int64)
    drop = np.maximum(np.asarray(n_full, dtype=np.int64)[members] - kept, 0)
    used = np.bincount(seq_of, weights=kept, minlength=S).astype(np.int64)
    total_drop = np.bincount(seq_of, weights=drop, minlength=S).astype(np.int64)
    give = np.minimum(np.maximum(int(seq_len) - used, 0), total_drop)  # (S,) tokens to restore
    T = np.maximum(total_drop, 1)[seq_of]
    num = give[seq_of] * drop
    add = num // T  # (n_members,) proportional share, floored; < drop unless give == total_drop
    frac = num % T
    rem = give - np.bincount(seq_of, weights=add, minlength=S).astype(np.int64)
    # One more token to the `rem` members of each sequence with the largest remainders (all have
    # frac > 0, so they still stay within their own dropped tokens).
    order = np.lexsort((np.arange(len(members)), -frac, seq_of))
    rank = np.arange(len(members)) - offsets[seq_of[order]]
    add[order] += rank < rem[seq_of[order]]
    out[members] = (kept + add).astype(out.dtype)
    return out
