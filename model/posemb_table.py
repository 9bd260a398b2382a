"""A ViT's absolute 2-D position table, resampled to each image's patch grid (``posemb: table2d``).

What a pretrained ViT (timm, big_vision) learned is one embedding per cell of a fixed square grid
(``max_grid`` × ``max_grid``, e.g. 14 × 14 for 224-px images with 16-px patches). NaViT's images
each have their own grid, so every token reads the table *bilinearly resampled to its image's grid*,
the same values as ``F.interpolate(table, (grid_h, grid_w), mode="bilinear", align_corners=False)``
(no antialiasing) at the token's (row, col) — computed per token with integer source coordinates,
so no loop over the distinct grids of a batch is needed and an image whose grid equals the table's
reads the table's rows exactly (a converted ViT reproduces its own features on its own image size).

Per axis, for a grid of ``g`` cells read from a table of ``G``: the source coordinate of cell ``r``
is ``(r + 0.5)·G/g − 0.5``, clamped at 0; the two table cells around it are mixed linearly. As an
integer fraction ``((2r+1)·G − g) / (2g)``, its floor and remainder are exact.
"""

from __future__ import annotations

import torch
from torch import nn


def _axis(
    pos: torch.Tensor, grid: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower index, upper index, weight of the upper) for positions ``pos`` of grids ``grid`` read
    from ``size`` table cells; all (...) shaped."""
    num = ((2 * pos + 1) * size - grid).clamp_min(0)  # (...) numerator of the source coordinate
    den = 2 * grid
    lo = num.div(den, rounding_mode="floor").clamp_max(size - 1)
    frac = (num - lo * den).float() / den.float()  # in [0, 1); 0 when the coordinate is a cell
    hi = (lo + 1).clamp_max(size - 1)
    frac = torch.where(lo >= size - 1, torch.zeros_like(frac), frac)
    return lo, hi, frac


class TablePosEmb(nn.Module):
    """``forward(pos_hw, grid_hw) -> (..., dim)``: a learned ``(size, size, dim)`` table, bilinearly
    resampled to each token's image grid (see the module docstring)."""

    def __init__(self, dim: int, size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.size, self.dim, self.init_std = size, dim, init_std
        self.table = nn.Parameter(torch.empty(size * size, dim))  # row-major (row, col) cells
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table, std=self.init_std)

    def forward(self, pos_hw: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        pos = pos_hw.long()  # (..., 2)
        grid = grid_hw.long().clamp_min(1)  # padding has grid 0
        y0, y1, wy = _axis(pos[..., 0], grid[..., 0], self.size)  # (...)
        x0, x1, wx = _axis(pos[..., 1], grid[..., 1], self.size)
        s = self.size

        def cell(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            # index_select: a deterministic backward (see model.posemb._lookup)
            idx = (y * s + x).reshape(-1)
            return self.table.index_select(0, idx).view(*y.shape, self.dim)

        wy, wx = wy[..., None], wx[..., None]  # (..., 1)
        top = cell(y0, x0) * (1 - wx) + cell(y0, x1) * wx
        bottom = cell(y1, x0) * (1 - wx) + cell(y1, x1) * wx
        return top * (1 - wy) + bottom * wy  # (..., D)
