"""Cutting-stock LP over the histogram of lengths (Gilmore–Gomory column generation).

Owns :func:`solve_cutting_stock`, used by :func:`packer.plan.binpack.lp_bound` (a lower bound on the number
of sequences, tighter than ``ceil(sum / seq_len)`` when many items exceed half a sequence) and by the
``histogram`` packer (which rounds the LP's patterns into sequences).

The master problem, over patterns ``a`` (how many items of each distinct length one sequence holds)::

    min  sum_p x_p    s.t.  sum_p a_p x_p >= d,  x >= 0          (d: items per distinct length)

is solved by a small dense revised simplex (scipy is not a dependency; the basis is m x m with
m <= seq_len distinct lengths). New columns come from the pricing problem, an integer knapsack
``max y.a  s.t.  lengths.a <= seq_len, sum(a) <= max_images`` solved by dynamic programming over
capacity. Every iterate yields a valid lower bound (Farley): with duals ``y >= 0`` and best pricing
value ``K``, ``y / K`` is dual feasible, so ``LP* >= d.y / K``; at optimality ``K = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-9


@dataclass
class CuttingStockLP:
    """Result of column generation. ``patterns`` (P, m) int64, ``x`` (P,) float64 (a feasible primal
    solution: ``patterns.T @ x >= demand``), ``bound`` a valid lower bound on the LP optimum,
    ``value`` the primal objective ``sum(x)``; ``optimal`` when pricing found no improving column."""

    patterns: np.ndarray
    x: np.ndarray
    bound: float
    value: float
    optimal: bool
    iterations: int


def _knapsack(vals: np.ndarray, y: np.ndarray, seq_len: int, max_images: int) -> tuple[float, np.ndarray]:
    """Best pattern for duals ``y``: max ``y.a`` with ``vals.a <= seq_len``, ``sum(a) <= max_images``.

    vals: (m,) distinct lengths; y: (m,) duals. Returns (value, a (m,) int64).
    """
    m = len(vals)
    pos = np.flatnonzero(y > _EPS)  # items worth packing at all
    a = np.zeros(m, dtype=np.int64)
    if len(pos) == 0:
        return 0.0, a
    # An item is never needed if a shorter (or equal) one is worth at least as much: keep the
    # Pareto frontier (length ascending, value strictly increasing). Valid with the image cap too.
    pos = pos[np.lexsort((-y[pos], vals[pos]))]
    yv_sorted = y[pos]
    pos = pos[yv_sorted > np.maximum.accumulate(np.r_[-np.inf, yv_sorted[:-1]])]
    lv, yv = vals[pos], y[pos]
    L = int(seq_len)
    if max_images * int(lv.min()) >= L:
        # Cardinality cannot bind: unbounded knapsack as 0/1 knapsack over binary-split copies
        # (1, 2, 4, ... of each item), each a vectorised shift-and-max over capacities.
        f = np.zeros(L + 1)  # (L+1,) best value within capacity c
        steps: list[tuple[int, int, np.ndarray]] = []  # (item, copies, took (L+1,) bool)
        for j in range(len(lv)):
            w, v = int(lv[j]), float(yv[j])
            left = L // w  # copies that could ever fit
            s = 1
            while left > 0:
                s = min(s, left)
                sw = s * w
                cand = f[: L + 1 - sw] + s * v  # a new array, so the update below is 0/1
                took = np.zeros(L + 1, dtype=bool)
                np.greater(cand, f[sw:] + _EPS, out=took[sw:])
                np.maximum(f[sw:], cand, out=f[sw:])
                steps.append((j, s, took))
                left -= s
                s *= 2
        c = L
        for j, s, took in reversed(steps):
            if took[c]:
                a[pos[j]] += s
                c -= s * int(lv[j])
        return float(f[L]), a
    # Cardinality binds: g[c, n] = best value within capacity c using at most n items.
    M = int(max_images)
    g = np.zeros((L + 1, M + 1))
    choice = np.full((L + 1, M + 1), -1, dtype=np.int64)
    for c in range(1, L + 1):
        g[c] = g[c - 1]
        fit = np.flatnonzero(lv <= c)
        if len(fit):
            cand = g[c - lv[fit], :-1] + yv[fit, None]  # (len(fit), M)
            j = np.argmax(cand, axis=0)  # (M,)
            v = cand[j, np.arange(M)]
            better = v > g[c, 1:] + _EPS
            g[c, 1:][better] = v[better]
            choice[c, 1:][better] = fit[j[better]]
    c, n = L, M
    while c > 0 and n > 0:
        j = choice[c, n]
        if j < 0:
            c -= 1
        else:
            a[pos[j]] += 1
            c -= int(lv[j])
            n -= 1
    return float(g[L, M]), a


def solve_cutting_stock(
    vals: np.ndarray,
    demand: np.ndarray,
    seq_len: int,
    max_images: int,
    *,
    seed_patterns: np.ndarray | None = None,
    max_iter: int | None = None,
) -> CuttingStockLP:
    """Column generation for the cutting-stock LP. vals: (m,) distinct lengths in [1, seq_len];
    demand: (m,) positive counts. ``seed_patterns`` (K, m): feasible patterns to start the column pool
    with (e.g. those of a best-fit packing) — pivots priced from the pool are far cheaper than a
    knapsack. ``max_iter`` caps simplex pivots (default ``50 * m + 500``); when it is hit the primal
    solution is still feasible and ``bound`` still valid, only not tight."""
    vals = np.asarray(vals, dtype=np.int64)
    d = np.asarray(demand, dtype=np.float64)
    m = len(vals)
    if m == 0:
        return CuttingStockLP(np.zeros((0, 0), np.int64), np.zeros(0), 0.0, 0.0, True, 0)
    if max_iter is None:
        max_iter = 50 * m + 500
    # Initial basis: one homogeneous pattern per length (diagonal, so trivially invertible).
    per = np.minimum(seq_len // vals, max_images).astype(np.int64)  # (m,)
    cols: list[np.ndarray] = []  # pattern columns (m,) int64; surplus columns are index -1 - i
    basis = np.arange(m)  # column id per basis row; >= 0 pattern index, < 0 surplus of row -1-id
    for i in range(m):
        a = np.zeros(m, dtype=np.int64)
        a[i] = per[i]
        cols.append(a)
    # Column pool (K, m) float: every pattern seen, priced by one mat-vec before any knapsack.
    pool = np.zeros((max(64, 2 * m), m))
    pool[:m] = np.diag(per)
    n_pool = m
    if seed_patterns is not None and len(seed_patterns):
        seeds = np.asarray(seed_patterns, dtype=np.int64).reshape(-1, m)
        cols.extend(seeds)
        pool = np.concatenate([pool[:n_pool], seeds.astype(np.float64), np.zeros((m, m))])
        n_pool += len(seeds)
    B_inv = np.diag(1.0 / per)  # (m, m)
    cost = np.ones(m)  # (m,) objective coefficient of each basic column
    xb = B_inv @ d  # (m,)
    trivial = float(vals @ d) / seq_len
    bound = trivial
    optimal = False
    it = 0
    for it in range(1, max_iter + 1):
        if it % 128 == 0:  # refactorise to stop round-off from drifting
            B = np.zeros((m, m))
            for r_, j in enumerate(basis.tolist()):
                if j >= 0:
                    B[:, r_] = cols[j]
                else:
                    B[-1 - j, r_] = -1.0
            B_inv = np.linalg.inv(B)
            xb = B_inv @ d
        y = cost @ B_inv  # (m,) duals
        neg = int(np.argmin(y))
        rc = 1.0 - pool[:n_pool] @ y  # (K,) reduced costs of pooled patterns
        best = int(np.argmin(rc))
        if y[neg] < -_EPS:  # a surplus column prices out: let row `neg` be over-covered
            col = np.zeros(m)
            col[neg] = -1.0
            enter_id, enter_cost = -1 - neg, 0.0
        elif rc[best] < -1e-9:
            col = pool[best].copy()
            enter_id, enter_cost = best, 1.0
        else:
            kval, a_new = _knapsack(vals, y, seq_len, max_images)
            if kval > _EPS:
                bound = max(bound, float(y @ d) / max(kval, 1.0))
            if kval <= 1.0 + 1e-9:
                optimal = True
                break
            cols.append(a_new)
            if n_pool == len(pool):
                pool = np.concatenate([pool, np.zeros_like(pool)])
            pool[n_pool] = a_new
            n_pool += 1
            col = a_new.astype(np.float64)
            enter_id, enter_cost = len(cols) - 1, 1.0
        u = B_inv @ col  # (m,) direction
        ok = u > _EPS
        if not ok.any():  # unbounded cannot happen (objective >= 0); stop defensively
            break
        ratios = np.full(m, np.inf)
        ratios[ok] = np.maximum(xb[ok], 0.0) / u[ok]
        theta = float(ratios.min())
        tied = np.flatnonzero(ratios <= theta + 1e-12)
        if len(tied) > 1:
            # Lexicographic ratio test: degenerate pivots (many x_B = 0 when demands are small)
            # can cycle; the lexicographically smallest row of B^-1 / u among the ties is unique.
            rows = B_inv[tied] / u[tied, None]  # (T, m)
            for j in range(m):
                colj = rows[:, j]
                keep = colj <= colj.min() + 1e-12
                tied, rows = tied[keep], rows[keep]
                if len(tied) == 1:
                    break
        r = int(tied[0])
        theta = ratios[r]
        xb = xb - theta * u
        xb[r] = theta
        piv = B_inv[r] / u[r]
        B_inv = B_inv - np.outer(u, piv)
        B_inv[r] = piv
        basis[r] = enter_id
        cost[r] = enter_cost
    value = float(cost @ xb)
    if optimal:
        bound = max(bound, value)
    keep = [(j, xb[r]) for r, j in enumerate(basis.tolist()) if j >= 0 and xb[r] > _EPS]
    patterns = np.array([cols[j] for j, _ in keep], dtype=np.int64).reshape(len(keep), m)
    x = np.array([v for _, v in keep], dtype=np.float64)
    return CuttingStockLP(patterns, x, bound, value, optimal, it)
