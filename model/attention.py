"""Attention over packed rows: the per-forward token layout and the four interchangeable backends.

Owns *where tokens live* during a forward and *how attention is restricted to one image*.
All backends compute the same function — each token attends to the tokens of its own image only —
and differ in cost:

==========  =========================================================  ==========================
backend     how                                                        trunk layout
==========  =========================================================  ==========================
dense       explicit (B, 1, L, L) block-diagonal mask + SDPA           rows (B, L, D)
segment     images grouped by (bucketed) length, one SDPA per group    real tokens only (T, D)
flex        FlexAttention with a document BlockMask, compiled          rows (B, L, D)
varlen      ``torch.nn.attention.varlen.varlen_attn`` (CUDA, 16-bit)   real tokens only (T, D)
==========  =========================================================  ==========================

The layout is computed once per forward (:func:`build_layout`) and shared by every layer and head.
Its *image order* — row-major, then by segment id — is the order of the model's outputs.

"Real tokens only" layouts (segment, varlen) never compute anything for padding, so padding content
cannot reach any output and the MLPs do no wasted work. Row layouts (dense, flex) compute padding
tokens but let them attend only to padding; their values are dropped before pooling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "dense", "segment", "flex", "varlen")


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` → ``flex`` on CUDA, ``segment`` elsewhere; explicit names pass through."""
    if name not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "flex" if device.type == "cuda" else "segment"
    if name == "varlen" and device.type != "cuda":
        raise ValueError(
            "attention='varlen' needs CUDA (flash-attention varlen kernels); use 'segment' on CPU"
        )
    return name


def bucket_length(n: int, steps_per_octave: int) -> int:
    """Length an image of ``n`` tokens is padded to in the segment backend.

    ``0`` → exact lengths (images of equal length share one mask-free SDPA call). ``s > 0`` →
    round up to a multiple of ``2**floor(log2 n) / s`` (at most ~1/s padding waste per image), so
    that fewer, larger SDPA calls with a small key-padding mask replace many small ones."""
    if steps_per_octave <= 0 or n <= 8:
        return n
    q = max(1, (1 << (n.bit_length() - 1)) // steps_per_octave)
    return -(-n // q) * q


@dataclass
class _Bucket:
    """Images padded to one length ``nb``: a (G, nb) gather of token slots and its key mask."""

    gather: (
        torch.Tensor
    )  # (G*nb,) int64 indices into the (T,) real tokens; pads repeat the image's own tokens
    key_mask: torch.Tensor | None  # (G, 1, 1, nb) bool, True = real key; None when no padding
    groups: int
    length: int


@dataclass
class Layout:
    """Everything a forward needs to know about the packing, computed once (one host sync).

    Images are numbered ``0..N-1`` in (row, segment id) order; tokens of the real-token layout are
    numbered ``0..T-1`` image by image, in their order within the row.
    """

    backend: str
    batch: int  # B rows
    seq_len: int  # L tokens per row
    token_index: torch.Tensor  # (T,) int64, flat position b*L + l of each real token
    image_of_token: torch.Tensor  # (T,) int64, image id of each real token
    image_rows: torch.Tensor  # (N,) int64, row of each image
    image_segments: torch.Tensor  # (N,) int64, segment id of each image
    lengths: np.ndarray  # (N,) tokens per image, on the host
    packed: bool  # trunk runs on (T, D) real tokens (True) or (B, L, D) rows (False)
    # backend state, built once and reused by every layer
    dense_mask: torch.Tensor | None = None  # (B, 1, L, L) bool
    buckets: list[_Bucket] = field(default_factory=list)
    token_slot: torch.Tensor | None = None  # (T,) where each token's output sits in the bucket outputs
    block_mask: object | None = None  # flex BlockMask
    cu_seqlens: torch.Tensor | None = None  # (N+1,) int32 for varlen
    max_len: int = 0

    @property
    def num_images(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.token_index.shape[0])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention restricted to each image. Packed: q/k/v (T, H, d) → (T, H, d);
        rows: (B, L, H, d) → (B, L, H, d)."""
        if self.backend == "segment":
            return _segment_attend(self, q, k, v)
        if self.backend == "varlen":
            return _varlen_attend(self, q, k, v)
        # Row layouts: SDPA/flex want (B, H, L, d).
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if self.backend == "dense":
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=self.dense_mask)
        else:
            o = _flex_attention()(qt, kt, vt, block_mask=self.block_mask)
        return o.transpose(1, 2)  # (B, L, H, d)


@torch.compiler.disable
def build_layout(
    segment_ids: torch.Tensor,
    backend: str,
    segment_buckets: int = 0,
    with_dense_mask: bool = True,
    host: np.ndarray | None = None,
) -> Layout:
    """The layout of a batch of rows for ``backend`` (already resolved, not ``auto``).

    Needs the host to see the segment ids once (data-dependent shapes: T tokens, N images), hence
    excluded from torch.compile graphs. ``host``: the same segment ids already on the host (the
    batch's host copy), which spares the device→host copy — on CUDA a sync that would stall the
    step until the GPU has finished all queued work."""
    seg = segment_ids.long()  # (B, L)
    b, length = seg.shape
    dev = seg.device
    # the one host sync of the forward, unless the caller has the ids on the host
    seg_host = np.asarray(host) if host is not None else seg.cpu().numpy()
    flat = seg_host.reshape(-1)
    real = np.flatnonzero(flat > 0)  # (T,) flat positions of real tokens, row-major
    # Image key = (row, segment id); a stable sort keeps each image's tokens in row order even if an
    # image's tokens were not contiguous.
    key = (real // length) * (np.int64(flat.max(initial=0)) + 1) + flat[real]  # (T,)
    order = np.argsort(key, kind="stable")
    token_index = real[order]
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, len(key)]).astype(np.int64)  # (N,)
    rows = token_index[starts] // length
    segs = flat[token_index[starts]]
    image_of_token = np.repeat(np.arange(len(lengths)), lengths)  # (T,)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev, non_blocking=True)

    lay = Layout(
        backend=backend,
        batch=b,
        seq_len=length,
        token_index=t(token_index),
        image_of_token=t(image_of_token),
        image_rows=t(rows),
        image_segments=t(segs),
        lengths=lengths,
        packed=backend in ("segment", "varlen"),
    )
    if backend == "dense" and with_dense_mask:
        # Padding attends to padding (never to an image), so no query row is fully masked.
        lay.dense_mask = (seg[:, :, None] == seg[:, None, :])[:, None]  # (B, 1, L, L)
    elif backend == "segment":
        _build_buckets(lay, lengths, starts, segment_buckets, dev)
    elif backend == "flex":
        lay.block_mask = _document_block_mask(seg)
    elif backend == "varlen":
        cu = np.r_[0, np.cumsum(lengths)]
        lay.cu_seqlens = torch.from_numpy(cu.astype(np.int32)).to(dev, non_blocking=True)
        lay.max_len = int(lengths.max(initial=0))
    return lay


# ---------------------------------------------------------------- segment (CPU default)


def _build_buckets(
    lay: Layout, lengths: np.ndarray, starts: np.ndarray, steps: int, dev: torch.device
) -> None:
    total = int(lengths.sum())
    nb_of = np.array([bucket_length(int(n), steps) for n in lengths], dtype=np.int64)  # (N,)
    token_slot = np.zeros(total, dtype=np.int64)
    base = 0
    for nb in np.unique(nb_of):
        imgs = np.flatnonzero(nb_of == nb)  # images of this bucket, in image order
        n = lengths[imgs]  # (G,)
        col = np.arange(nb)  # (nb,)
        valid = col[None, :] < n[:, None]  # (G, nb)
        # Pad slots re-read the image's own last token: masked as keys, dropped as queries, and no
        # index ever points into another image.
        gather = starts[imgs][:, None] + np.minimum(col[None, :], n[:, None] - 1)  # (G, nb)
        g, j = np.nonzero(valid)
        token_slot[starts[imgs][g] + j] = base + g * nb + j
        mask = None
        if not valid.all():
            mask = torch.from_numpy(valid).to(dev, non_blocking=True)[:, None, None, :]  # (G, 1, 1, nb)
        lay.buckets.append(
            _Bucket(torch.from_numpy(gather.reshape(-1)).to(dev, non_blocking=True), mask, len(imgs), int(nb))
        )
        base += len(imgs) * int(nb)
    lay.token_slot = torch.from_numpy(token_slot).to(dev, non_blocking=True)


def _segment_attend(lay: Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q, k, v: (T, H, d)
    if not lay.buckets:
        return q.new_zeros(q.shape)
    outs = []
    for bk in lay.buckets:
        g, nb = bk.groups, bk.length

        def grab(x: torch.Tensor, g: int = g, nb: int = nb, idx: torch.Tensor = bk.gather) -> torch.Tensor:
            return x.index_select(0, idx).view(g, nb, *x.shape[1:]).transpose(1, 2)  # (G, H, nb, d)

        o = F.scaled_dot_product_attention(grab(q), grab(k), grab(v), attn_mask=bk.key_mask)
        outs.append(o.transpose(1, 2).reshape(g * nb, *q.shape[1:]))  # (G*nb, H, d)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return o.index_select(0, lay.token_slot)  # (T, H, d)


# ---------------------------------------------------------------- flex (CUDA default)

_FLEX = None


def _flex_attention():  # noqa: ANN202 - returns the compiled callable
    """flex_attention compiled once per process (eager flex is a slow reference implementation)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _document_block_mask(seg: torch.Tensor) -> object:
    """A BlockMask where token q sees token k iff they share a segment id (padding sees padding).
    Built once per forward and shared by every layer; blocks between different images are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, length = seg.shape

    def same_image(bi, hi, qi, ki):  # noqa: ANN001, ANN202 - flex mask_mod signature
        return seg[bi, qi] == seg[bi, ki]

    return create_block_mask(same_image, B=b, H=None, Q_LEN=length, KV_LEN=length, device=seg.device)


# ---------------------------------------------------------------- varlen (CUDA)


def _varlen_attend(lay: Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q, k, v: (T, H, d), images back to back; cu_seqlens marks their boundaries.
    if lay.num_tokens == 0:
        return q.new_zeros(q.shape)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("attention='varlen' needs bf16/fp16 activations (use autocast); float32 → 'segment'")
    from torch.nn.attention.varlen import varlen_attn

    # Early releases of varlen_attn (torch 2.10) take no ``scale``; their fixed 1/sqrt(d) is this one.
    kwargs = {"scale": 1.0 / math.sqrt(q.shape[-1])} if _varlen_takes_scale(varlen_attn) else {}
    return varlen_attn(q, k, v, lay.cu_seqlens, lay.cu_seqlens, lay.max_len, lay.max_len, **kwargs)


def _varlen_takes_scale(fn: object) -> bool:
    import inspect

    try:
        return "scale" in inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
