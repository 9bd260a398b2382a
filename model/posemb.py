"""Factorized 2-D position embeddings for native-resolution patches: ``φx(rx) + φy(ry)``.

Owns the four variants NaViT compares. Every token carries its patch index ``(row, col)`` and its
image's patch grid ``(grid_h, grid_w)``:

- ``learned``  — fractional coordinates ``row / grid_h`` bucketed into ``posemb_buckets`` slots of a
  learned table per axis (the paper's default). Bucketing is integer arithmetic
  (``row * buckets // grid_h``), so the same relative position at two grid sizes lands in the same
  bucket exactly.
- ``sincos``   — fixed sine/cosine features of ``(row / grid_h) * max_grid``; the x features fill the
  first half of the channels and the y features the second half (so ``φx`` and ``φy`` cannot cancel
  or swap: a plain sum of one shared function would make (a, b) and (b, a) identical).
- ``fourier``  — learned Fourier features (learned frequencies, cos/sin, linear map) of the fractional
  coordinate, per axis.
- ``absolute`` — index-based tables over ``max_grid`` rows/columns, as vit-pytorch's ``na_vit``;
  indices beyond the table are clamped to its last entry.

Padding tokens have ``grid_hw == 0``; the grid is clamped to 1 so they get a finite (ignored) value.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POSEMB_KINDS = ("learned", "sincos", "fourier", "absolute")


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]``: (K, D) table, (...) int64 indices -> (..., D), with a run-to-run
    deterministic backward.

    Not ``table[idx]``: its backward (``index_put_`` with accumulate) splits the token rows over
    threads on CPU and adds them into the table with atomics, so with more than one intra-op thread
    the summation order, hence the low bits of the gradient, change from run to run (two identical
    training runs drifted apart from step 2). ``index_select``'s backward is ``index_add_``, which
    on CPU adds rows in index order whatever the thread count; it was also the fastest of the
    formulations measured in benchmarks/bench_posemb.py (see docs/model.md)."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[-1])


class FactorizedPosEmb(nn.Module):
    """``forward(pos_hw, grid_hw) -> (..., dim)`` for integer ``pos_hw``/``grid_hw`` of shape (..., 2)."""

    def __init__(self, kind: str, dim: int, buckets: int, max_grid: int, init_std: float = 0.02) -> None:
        super().__init__()
        if kind not in POSEMB_KINDS:
            raise ValueError(f"posemb must be one of {POSEMB_KINDS}, got {kind!r}")
        self.kind, self.dim, self.buckets, self.max_grid = kind, dim, buckets, max_grid
        self.init_std = init_std  # std of the 'learned'/'absolute' tables at initialisation
        if kind == "learned":
            self.table_y = nn.Parameter(torch.empty(buckets, dim))  # (buckets, D)
            self.table_x = nn.Parameter(torch.empty(buckets, dim))
        elif kind == "absolute":
            self.table_y = nn.Parameter(torch.empty(max_grid, dim))  # (max_grid, D)
            self.table_x = nn.Parameter(torch.empty(max_grid, dim))
        elif kind == "fourier":
            nf = dim // 4  # frequencies per axis → 2*nf cos/sin features
            self.freq_y = nn.Parameter(torch.empty(nf))
            self.freq_x = nn.Parameter(torch.empty(nf))
            self.proj_y = nn.Linear(2 * nf, dim)
            self.proj_x = nn.Linear(2 * nf, dim)
        else:  # sincos: fixed frequencies, a buffer so it follows .to(device)
            nf = dim // 4
            omega = 1.0 / (10000.0 ** (torch.arange(nf, dtype=torch.float64) / nf))
            self.register_buffer("omega", omega.float(), persistent=False)  # (nf,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.kind in ("learned", "absolute"):
            nn.init.normal_(self.table_y, std=self.init_std)
            nn.init.normal_(self.table_x, std=self.init_std)
        elif self.kind == "fourier":
            # Frequencies in cycles per image: spread up to ~max_grid/2 (the Nyquist rate of the
            # reference grid) so that initially both coarse and patch-level positions are separable.
            nn.init.normal_(self.freq_y, std=self.max_grid / 8)
            nn.init.normal_(self.freq_x, std=self.max_grid / 8)
            for lin in (self.proj_y, self.proj_x):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def forward(self, pos_hw: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        pos = pos_hw.long()  # (..., 2)
        grid = grid_hw.long().clamp_min(1)  # (..., 2); padding has grid 0
        ry, rx = pos[..., 0], pos[..., 1]  # (...)
        gy, gx = grid[..., 0], grid[..., 1]
        if self.kind == "learned":
            by = (ry * self.buckets).div(gy, rounding_mode="floor").clamp(0, self.buckets - 1)
            bx = (rx * self.buckets).div(gx, rounding_mode="floor").clamp(0, self.buckets - 1)
            return _lookup(self.table_y, by) + _lookup(self.table_x, bx)  # (..., D)
        if self.kind == "absolute":
            top = self.max_grid - 1
            return _lookup(self.table_y, ry.clamp(0, top)) + _lookup(self.table_x, rx.clamp(0, top))
        fy = ry.float() / gy.float()  # (...) fractional coordinate in [0, 1)
        fx = rx.float() / gx.float()
        if self.kind == "fourier":
            return self._fourier(fy, self.freq_y, self.proj_y) + self._fourier(fx, self.freq_x, self.proj_x)
        # sincos: φy occupies channels [0, D/2), φx channels [D/2, D).
        return torch.cat([self._sincos(fy), self._sincos(fx)], dim=-1)  # (..., D)

    def _sincos(self, frac: torch.Tensor) -> torch.Tensor:
        ang = (frac * self.max_grid)[..., None] * self.omega  # (..., nf)
        return torch.cat([ang.sin(), ang.cos()], dim=-1)  # (..., D/2)

    @staticmethod
    def _fourier(frac: torch.Tensor, freq: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        ang = (2 * math.pi) * frac[..., None] * freq  # (..., nf)
        return proj(torch.cat([ang.cos(), ang.sin()], dim=-1))  # (..., D)
