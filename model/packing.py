"""In-memory packing of whole images into rows of patch tokens, and the model's output order.

Owns :func:`pack_images` (a small, dependency-free packer for notebooks, tests and serving; the
Ray packing service produces the same batch format at scale) and :func:`image_index` /
:func:`num_images`, which say which image each output row of the model belongs to.

Batch format (dict of tensors)::

    patches     uint8 (B, L, p*p*C)  token-major; each patch's pixels in (row, col, channel) order
    segment_ids int32 (B, L)         0 = padding, 1..k = k-th image of the row
    pos_hw      int32 (B, L, 2)      token's patch (row, col) in its image's grid
    grid_hw     int32 (B, L, 2)      its image's patch grid (grid_h, grid_w); 0 on padding

Output order: images are ordered row-major, then by segment id; a row without images contributes
nothing. ``labels[i]`` for ``out.logits[i]`` is therefore the concatenation of each row's label list
in segment order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def patchify(img: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) → (H/p * W/p, p*p*C) tokens, row-major over the grid, pixels (row, col, channel)."""
    h, w, c = img.shape
    p = patch_size
    gh, gw = h // p, w // p
    return img.reshape(gh, p, gw, p, c).transpose(0, 2, 1, 3, 4).reshape(gh * gw, p * p * c)


def pack_images(
    images: Sequence[np.ndarray],
    patch_size: int,
    seq_len: int,
    max_images_per_seq: int | None = None,
    channels: int = 3,
) -> dict[str, torch.Tensor]:
    """Pack whole images greedily, in order, into as many rows of ``seq_len`` tokens as needed.

    Each image (``H x W x channels`` uint8, sides multiples of ``patch_size``, at most ``seq_len``
    patches) is appended to the current row if it fits (and the row holds fewer than
    ``max_images_per_seq`` images), else starts a new row. No token is dropped, no image reordered,
    so output ``i`` of the model is ``images[i]``."""
    if patch_size < 1 or seq_len < 1:
        raise ValueError(f"patch_size and seq_len must be >= 1, got {patch_size}, {seq_len}")
    if max_images_per_seq is not None and max_images_per_seq < 1:
        raise ValueError(f"max_images_per_seq must be >= 1, got {max_images_per_seq}")
    if len(images) == 0:
        raise ValueError("pack_images: no images given")
    p = patch_size
    tokens: list[np.ndarray] = []
    grids: list[tuple[int, int]] = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise ValueError(f"image {i}: expected a numpy array, got {type(img).__name__}")
        if img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected dtype uint8, got {img.dtype}")
        if img.ndim != 3 or img.shape[2] != channels:
            raise ValueError(f"image {i}: expected shape (H, W, {channels}), got {img.shape}")
        h, w = img.shape[:2]
        if h == 0 or w == 0 or h % p or w % p:
            raise ValueError(f"image {i}: size {h}x{w} is not a positive multiple of patch_size {p}")
        n = (h // p) * (w // p)
        if n > seq_len:
            raise ValueError(f"image {i}: {h}x{w} has {n} patches, more than seq_len {seq_len}")
        tokens.append(patchify(img, p))
        grids.append((h // p, w // p))

    # Greedy in-order assignment: (row, offset) per image.
    place: list[tuple[int, int, int]] = []  # (row, segment id, offset)
    row, used, count = 0, 0, 0
    for tok in tokens:
        n = len(tok)
        full = max_images_per_seq is not None and count >= max_images_per_seq
        if used + n > seq_len or full:
            row, used, count = row + 1, 0, 0
        count += 1
        place.append((row, count, used))
        used += n

    rows = row + 1
    dim = p * p * channels
    patches = np.zeros((rows, seq_len, dim), np.uint8)  # (B, L, p*p*C)
    seg = np.zeros((rows, seq_len), np.int32)  # (B, L)
    pos = np.zeros((rows, seq_len, 2), np.int32)  # (B, L, 2)
    grid = np.zeros((rows, seq_len, 2), np.int32)  # (B, L, 2)
    for tok, (gh, gw), (r, s, off) in zip(tokens, grids, place, strict=True):
        n = len(tok)
        sl = slice(off, off + n)
        idx = np.arange(n)
        patches[r, sl] = tok
        seg[r, sl] = s
        pos[r, sl, 0] = idx // gw
        pos[r, sl, 1] = idx % gw
        grid[r, sl] = (gh, gw)
    return {
        "patches": torch.from_numpy(patches),
        "segment_ids": torch.from_numpy(seg),
        "pos_hw": torch.from_numpy(pos),
        "grid_hw": torch.from_numpy(grid),
    }


def image_index(segment_ids: torch.Tensor) -> torch.Tensor:
    """(N, 2) int64 ``(row, segment id)`` of each model output, in output order (row-major, then
    segment id; rows without images contribute nothing)."""
    seg = segment_ids.long().cpu()  # (B, L)
    b, _ = seg.shape
    smax = int(seg.max()) + 1 if seg.numel() else 1
    present = torch.zeros(b, smax, dtype=torch.bool)
    present.scatter_(1, seg, True)
    present[:, 0] = False  # padding is not an image
    return present.nonzero()  # row-major, then segment id


def num_images(segment_ids: torch.Tensor) -> int:
    """Number of images (= model outputs) in a batch."""
    return int(image_index(segment_ids).shape[0])
