"""Best-fit-decreasing core, grouped by length and keyed by remaining capacity.

This module owns the one hot loop of the planner. :func:`packer.plan.binpack.pack` calls it for ``bfd``,
for each window of ``stream`` and for the residue of ``histogram``.

Why it is fast without a compiler:

* Remaining capacities are integers in ``[0, seq_len]``, so the "smallest bin with capacity >= x"
  query is answered by a table of per-capacity bin stacks instead of a tree over bins: we walk the
  non-empty capacities ``>= x`` in ascending order (found once per distinct length with one numpy
  ``flatnonzero``), which costs O(seq_len) vectorised work per *distinct length*, not per item.
* Items are sorted decreasing and processed one distinct length at a time. Sequential best-fit of
  ``k`` equal items does something simple: the best bin takes items until it can hold no more
  (after one item it is still the tightest fit), then the next bin at the same capacity does, and so
  on. So we touch each (bin, length) pair once and place ``q`` items per touch; when no open bin
  fits, new bins are opened in bulk.

The result is *identical* to the textbook per-item algorithm with these tie rules (checked against a
naive reference in ``tests/test_binpack.py``): items in order (length descending, index ascending);
each goes into the open bin with the smallest remaining capacity that fits it and has image room;
among bins with equal remaining capacity, the one that reached that capacity most recently (a LIFO
stack per capacity); a new bin when none fits.
"""

from __future__ import annotations

import numpy as np


def bfd_groups(
    vals: np.ndarray,
    counts: np.ndarray,
    seq_len: int,
    max_images: int,
    cap: list[int],
    room: list[int],
    open_bins: list[int],
) -> tuple[list[int], list[int]]:
    """Place ``counts[g]`` items of length ``vals[g]`` (``vals`` strictly decreasing) by best fit.

    ``cap`` / ``room`` hold every bin's remaining tokens / image slots and are mutated in place; new
    bins are appended to them (their ids are the list positions). ``open_bins`` are the bins that may
    receive items at the start, pushed onto their capacity stacks in the given order (the last one
    wins ties). Returns ``(bins, q)``: the k-th touch put ``q[k]`` consecutive items (in sorted item
    order) into bin ``bins[k]``; ``np.repeat(bins, q)`` is the bin of each sorted item.
    """
    L, M = int(seq_len), int(max_images)
    min_len = int(vals[-1]) if len(vals) else 1
    # stacks[c]: open bins with exactly c tokens left (and >= 1 image slot); top = most recent.
    stacks: list[list[int]] = [[] for _ in range(L + 1)]
    nonempty = np.zeros(L + 1, dtype=np.int64)  # (L+1,) len(stacks[c]), for the vectorised scan
    for b in open_bins:
        c = cap[b]
        if c >= min_len and room[b] > 0:
            stacks[c].append(b)
            nonempty[c] += 1

    out_bins: list[int] = []
    out_q: list[int] = []
    for l_np, k_np in zip(vals.tolist(), counts.tolist(), strict=True):
        l, k = int(l_np), int(k_np)
        # Feasible capacities, ascending. Bins moved while placing this length land below l (they
        # are then useless for it) or the loop ends, so this list stays valid for the whole group.
        for c in (np.flatnonzero(nonempty[l:]) + l).tolist():
            stack = stacks[c]
            fl = c // l
            while stack and k:
                b = stack.pop()
                r = room[b]
                q = fl if fl < r else r
                if q > k:
                    q = k
                k -= q
                nc = c - q * l
                r -= q
                cap[b] = nc
                room[b] = r
                out_bins.append(b)
                out_q.append(q)
                if r and nc >= min_len:
                    stacks[nc].append(b)
                    nonempty[nc] += 1
            nonempty[c] = len(stack)
            if not k:
                break
        if k:
            # No open bin fits: open new ones in bulk, each taking q0 items (the last the remainder).
            q0 = min(L // l, M)
            n_new = -(-k // q0)
            first = len(cap)
            qs = [q0] * n_new
            qs[-1] = k - q0 * (n_new - 1)
            for j, q in enumerate(qs):
                nc = L - q * l
                r = M - q
                cap.append(nc)
                room.append(r)
                if r and nc >= min_len:
                    stacks[nc].append(first + j)
                    nonempty[nc] += 1
            out_bins.extend(range(first, first + n_new))
            out_q.extend(qs)
    return out_bins, out_q


def bfd_reference(
    lengths: np.ndarray, seq_len: int, max_images: int, cap: list[int], room: list[int], open_bins: list[int]
) -> list[int]:
    """Per-item O(n * bins) best-fit-decreasing with the same tie rules; for tests only.

    Returns the bin of each item in sorted order (length descending, index ascending).
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    stamp = {b: t for t, b in enumerate(open_bins)}  # when a bin last reached its capacity
    t = len(open_bins)
    active = set(b for b in open_bins if room[b] > 0)
    out = []
    for i in order.tolist():
        x = int(lengths[i])
        best = None
        for b in active:
            if cap[b] >= x and (
                best is None or cap[b] < cap[best] or (cap[b] == cap[best] and stamp[b] > stamp[best])
            ):
                best = b
        if best is None:
            best = len(cap)
            cap.append(seq_len)
            room.append(max_images)
            active.add(best)
        cap[best] -= x
        room[best] -= 1
        stamp[best] = t
        t += 1
        if room[best] == 0:
            active.discard(best)
        out.append(best)
    return out
