"""The plan: which image goes into which packed sequence, at what size, with how many tokens.

Produced by :mod:`packer.plan.planner` (no pixel decoded), executed by :mod:`packer.build.pipeline`. Columnar
(numpy arrays indexed by plan position) so that a million-image plan is a few dozen MB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Rejection:
    """An input that will not be packed, and why (one line, user-readable)."""

    image_id: int
    path: str
    reason: str
    label: int = -1
    orig_h: int = -1
    orig_w: int = -1


@dataclass
class Plan:
    """One epoch's plan. Arrays are parallel, one entry per *planned* image (plan position i).

    Sequences are stored CSR-style: sequence s holds plan positions
    ``seq_members[seq_offsets[s]:seq_offsets[s+1]]`` in layout order (segment 1, 2, ...).
    """

    epoch: int
    seq_len: int
    patch_size: int
    image_id: np.ndarray  # int64, stable id of the input image (its index in the sorted source listing)
    path: list[str]  # path or URI to read
    key: list[str]  # stable key (relative path) seeding the image's random draws
    label: np.ndarray  # int64, -1 = unlabeled
    orig_h: np.ndarray  # int32, native height after EXIF orientation
    orig_w: np.ndarray  # int32
    grid_h: np.ndarray  # int32, planned patch rows (>= 1)
    grid_w: np.ndarray  # int32, planned patch cols (>= 1)
    n_full: np.ndarray  # int32, grid_h * grid_w
    n_kept: np.ndarray  # int32, tokens kept after dropping (and after exact-fill), 1..n_full
    seq_offsets: np.ndarray  # int64, (n_sequences + 1,)
    seq_members: np.ndarray  # int64, plan positions in layout order
    rejected: list[Rejection] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # label index → class name
    # Pack-time augmentation (packer.plan.augment), None when off (= whole image, no flip): the crop box
    # (n, 4) int32 x0, y0, x1, y1 in oriented source pixels, and hflip (n,) bool.
    crop: np.ndarray | None = None
    hflip: np.ndarray | None = None

    def crop_box(self, i: int) -> tuple[int, int, int, int]:
        """Plan position i's crop (x0, y0, x1, y1) in oriented source pixels (whole image when off)."""
        if self.crop is None:
            return 0, 0, int(self.orig_w[i]), int(self.orig_h[i])
        x0, y0, x1, y1 = (int(v) for v in self.crop[i])
        return x0, y0, x1, y1

    def flipped(self, i: int) -> bool:
        return bool(self.hflip[i]) if self.hflip is not None else False

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def sequence(self, s: int) -> np.ndarray:
        return self.seq_members[self.seq_offsets[s] : self.seq_offsets[s + 1]]
