"""Attention backends on raw q/k/v: the per-forward layout (image order, lengths) and every backend
against a per-image reference computed one image at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.attention import bucket_length, build_layout, resolve_backend


def random_segments(rng: np.random.Generator, rows: int, length: int) -> torch.Tensor:
    """Rows of contiguous images of random lengths (1..length/2), random padding, some empty rows."""
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        if rng.random() < 0.2:
            continue  # a row with no images
        pos, s = 0, 0
        while pos < length and rng.random() < 0.9:
            n = int(min(rng.integers(1, length // 2 + 1), length - pos))
            s += 1
            seg[r, pos : pos + n] = s
            pos += n
    return torch.from_numpy(seg)


def per_image_reference(seg: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, L, H, d) attention computed image by image; padding rows left at zero."""
    out = torch.zeros_like(q)
    for r in range(seg.shape[0]):
        for s in seg[r].unique().tolist():
            if s == 0:
                continue
            m = seg[r] == s
            qi, ki, vi = (t[r][m].transpose(0, 1) for t in (q, k, v))  # (H, n, d)
            out[r][m] = F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1)
    return out


def test_layout_image_order_and_lengths():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [0, 0, 0, 0, 0, 0], [2, 2, 1, 3, 1, 0]])
    lay = build_layout(seg, "segment")
    # row-major then segment id; row 1 has no image; segment 1 of row 2 is split in two runs
    assert lay.image_rows.tolist() == [0, 0, 2, 2, 2]
    assert lay.image_segments.tolist() == [1, 2, 1, 2, 3]
    assert lay.lengths.tolist() == [2, 3, 2, 2, 1]
    assert lay.token_index.tolist() == [0, 1, 2, 3, 4, 14, 16, 12, 13, 15]
    assert lay.image_of_token.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("steps", [0, 1, 4, 8])
def test_bucket_length_bounds(steps):
    for n in range(1, 2000):
        nb = bucket_length(n, steps)
        assert nb >= n
        if steps:
            assert nb - n < max(1, n / steps)  # waste below one step of the octave
        else:
            assert nb == n


@pytest.mark.parametrize("backend", ["segment", "dense"])
@pytest.mark.parametrize("steps", [0, 4])
def test_backend_matches_per_image_reference(backend, steps):
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    seg = random_segments(rng, rows=6, length=40)
    q, k, v = (torch.randn(6, 40, 2, 8) for _ in range(3))  # (B, L, H, d)
    ref = per_image_reference(seg, q, k, v)
    lay = build_layout(seg, backend, steps)
    if lay.packed:
        flat = lambda t: t.reshape(-1, 2, 8)[lay.token_index]  # noqa: E731 - (T, H, d)
        got = lay.attend(flat(q), flat(k), flat(v))
        want = flat(ref)
    else:
        real = (seg > 0)[..., None, None]
        got = lay.attend(q, k, v) * real
        want = ref
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_all_padding_batch_is_legal():
    seg = torch.zeros(2, 8, dtype=torch.int32)
    lay = build_layout(seg, "segment")
    assert lay.num_images == 0 and lay.num_tokens == 0
    q = torch.zeros(0, 2, 4)
    assert lay.attend(q, q, q).shape == (0, 2, 4)


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "segment"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("dense", cpu) == "dense"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("varlen", cpu)
    with pytest.raises(ValueError, match="one of"):
        resolve_backend("sparse", cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_gpu_backend_matches_reference_bf16(backend):
    rng = np.random.default_rng(1)
    seg = random_segments(rng, rows=4, length=256).cuda()
    q, k, v = (torch.randn(4, 256, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = per_image_reference(seg.cpu(), q.float().cpu(), k.float().cpu(), v.float().cpu()).cuda()
    lay = build_layout(seg, backend)
    if lay.packed:
        flat = lambda t: t.reshape(-1, 4, 64)[lay.token_index]  # noqa: E731
        got, want = lay.attend(flat(q), flat(k), flat(v)).float(), flat(ref)
    else:
        got, want = (lay.attend(q, k, v) * (seg > 0)[..., None, None]).float(), ref
    assert torch.allclose(got, want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", ["segment", "dense"])
def test_layout_from_the_host_copy_equals_the_layout_from_the_device_tensor(backend):
    # The trainer passes the batch's host copy of the segment ids (no device→host read on CUDA).
    seg = random_segments(np.random.default_rng(3), rows=5, length=32)
    a, b = build_layout(seg, backend, 4), build_layout(seg, backend, 4, host=seg.numpy())
    for name in ("token_index", "image_of_token", "image_rows", "image_segments"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.lengths, b.lengths)
    q, k, v = (
        (torch.randn(a.num_tokens, 2, 8) for _ in range(3)) if a.packed else (torch.randn(5, 32, 2, 8),) * 3
    )
    assert torch.equal(a.attend(q, k, v), b.attend(q, k, v))
