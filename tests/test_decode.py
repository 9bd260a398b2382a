"""packer.build.decode: every mode to RGB, EXIF orientation, JPEG draft scale, bombs and bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fixtures_images import bad_files, encode, exif_rotated_jpeg, mode_zoo, smooth_rgb
from PIL import Image

from packer import imagefile
from packer.build.decode import DecodeError, decode_rgb, load_resized, patchify, read_bytes, select_tokens
from packer.config import DecodeConfig

CFG = DecodeConfig()
ZOO = mode_zoo()
BASE = smooth_rgb(96, 64, seed=1)  # the upright content of every zoo image, (64, 96, 3)
P = 16


def native(name: str, cfg: DecodeConfig = CFG) -> np.ndarray:
    """Decode a zoo image at its native 96x64 size (4 x 6 patches of 16): no resampling involved."""
    return load_resized(ZOO[name], 4, 6, P, cfg).astype(np.int16)


def test_rgb_png_is_exact():
    assert np.array_equal(native("rgb.png"), BASE)


def test_greyscale_and_bilevel_replicate_channels():
    grey = np.asarray(Image.fromarray(BASE).convert("L"), np.int16)
    out = native("l.png")
    assert np.array_equal(out, np.repeat(grey[..., None], 3, -1))
    bi = native("bilevel.png")
    assert set(np.unique(bi)) <= {0, 255}
    assert np.array_equal(bi[..., 0], bi[..., 2])
    assert np.array_equal(bi[..., 0] == 255, grey > 128)


def test_sixteen_bit_is_scaled_not_clipped():
    grey = np.asarray(Image.fromarray(BASE).convert("L"), np.int16)
    out = native("i16.png")
    # The file holds grey * 257 (the full 16-bit range); clipping to 255 would make it all white.
    assert np.array_equal(out[..., 0], grey)


@pytest.mark.parametrize("bg", [(255, 255, 255), (0, 0, 0), (10, 200, 30)])
def test_alpha_is_composited_on_the_background(bg):
    cfg = DecodeConfig(background=bg)
    out = native("rgba.png", cfg)
    assert (out[:, :30] == np.array(bg)).all()  # alpha 0
    assert np.array_equal(out[:, 50:], BASE[:, 50:])  # alpha 255
    half = out[:, 30:50]
    expected = (BASE[:, 30:50].astype(np.float64) * 128 + np.array(bg) * 127) / 255
    assert np.abs(half - expected).max() <= 1.0
    la = native("la.png", cfg)
    grey = np.asarray(Image.fromarray(BASE).convert("L"), np.float64)
    alpha = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (64, 1)).astype(np.float64)
    exp = (grey[..., None] * alpha[..., None] + np.array(bg) * (255 - alpha[..., None])) / 255
    assert np.abs(la - exp).max() <= 1.0


def test_palette_with_and_without_transparency():
    pal = Image.open(io.BytesIO(ZOO["p.png"]))
    assert np.array_equal(native("p.png"), np.asarray(pal.convert("RGB"), np.int16))
    pt = Image.open(io.BytesIO(ZOO["p_transparent.png"]))
    idx = np.asarray(pt)
    transparent = idx == pt.info["transparency"]
    assert transparent.any() and not transparent.all()
    out = native("p_transparent.png", DecodeConfig(background=(1, 2, 3)))
    assert (out[transparent] == (1, 2, 3)).all()
    assert np.array_equal(out[~transparent], np.asarray(pt.convert("RGB"), np.int16)[~transparent])


def test_cmyk_jpeg_becomes_rgb():
    out = native("cmyk.jpg")
    assert np.abs(out - BASE).mean() < 4.0


def test_animated_gif_uses_first_frame():
    out = native("animated.gif")
    first = np.asarray(Image.fromarray(BASE).quantize(16).convert("RGB"), np.int16)
    assert np.abs(out - first).mean() < 2.0
    assert np.abs(out - (255 - BASE)).mean() > 50  # not the (inverted) second frame


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_comes_out_upright(orientation):
    out = native(f"exif{orientation}.jpg")
    assert out.shape == BASE.shape
    err = np.abs(out - BASE).mean()
    assert err < 3.0
    assert err < 0.2 * np.abs(out - BASE[::-1, ::-1]).mean()


def _full_then_resize(data: bytes, w: int, h: int) -> np.ndarray:
    """Reference: full decode, exif_transpose, resize — no draft."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return np.asarray(img.resize((w, h), Image.Resampling.BICUBIC), np.int16)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_draft_scale_is_computed_in_stored_orientation(orientation):
    upright = smooth_rgb(400, 1600, seed=2)  # tall: 400 wide, 1600 high
    data = exif_rotated_jpeg(upright, orientation, quality=92)
    # Target 100 x 400 (upright): a 1/4 DCT scale covers it exactly. Had the request not been
    # swapped for 6/8, the stored 1600x400 image would ask for 100x400 and get scale 1 (full size).
    img, box = decode_rgb(data, (100, 400), CFG)
    assert img.size == (100, 400)
    assert box is None
    out = load_resized(data, 25, 6, 16, CFG).astype(np.int16)  # 96 x 400: a real resize after draft
    assert np.abs(out - _full_then_resize(data, 96, 400)).mean() < 3.0


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_draft_with_partial_edge_keeps_geometry(orientation):
    # 1001 x 603 upright: no DCT scale divides it, so the scaled image has a partial last row/col
    # and the resize must use the box (placed according to the orientation) to stay aligned.
    yy, xx = np.mgrid[0:603, 0:1001]
    # Ramps plus a 50-px checkerboard: sharp edges make a sub-pixel misalignment visible.
    upright = np.stack([xx * 255 // 1001, yy * 255 // 603, ((xx // 50 + yy // 50) % 2) * 255], -1)
    data = exif_rotated_jpeg(upright.astype(np.uint8), orientation, quality=95)
    img, box = decode_rgb(data, (120, 72), CFG)
    assert box is not None
    assert img.width >= 120 and img.height >= 72 and img.width < 1001
    out = load_resized(data, 9, 15, 8, CFG).astype(np.int16)  # 120 x 72
    ref = _full_then_resize(data, 120, 72)
    # Measured: ~3 with the box in the right place, ~6-10 with no box or a box on the wrong side.
    assert np.abs(out - ref).mean() < 4.5


def test_upsamples_images_smaller_than_one_patch():
    tiny = encode(Image.fromarray(smooth_rgb(5, 7), "RGB"), "PNG")
    out = load_resized(tiny, 1, 1, P, CFG)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_bomb_rejected_from_the_header_before_any_decode(monkeypatch):
    def boom(self, *a, **k):
        raise AssertionError("pixels were decoded")

    data = encode(Image.fromarray(smooth_rgb(200, 150), "RGB"), "JPEG")
    bomb = bad_files()["bomb.png"]
    monkeypatch.setattr(Image.Image, "load", boom)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", boom)
    with pytest.raises(DecodeError, match=r"decompression bomb: 200x150 = 30000 pixels > decode.max_pixels"):
        decode_rgb(data, (32, 32), DecodeConfig(max_pixels=29_999))
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_rgb(bomb, (32, 32), CFG)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("zero.jpg", "zero-byte file"),
        ("text.jpg", "not an image"),
        ("garbage.png", "not an image"),
        ("truncated.jpg", "corrupt or truncated image"),
        ("bomb.png", "decompression bomb"),
    ],
)
def test_bad_files_give_one_line_reasons(tmp_path, name, reason):
    path = tmp_path / name
    path.write_bytes(bad_files()[name])
    with pytest.raises(DecodeError) as e:
        load_resized(str(path), 2, 2, P, CFG)
    assert e.value.reason.startswith(reason)
    assert "\n" not in e.value.reason


def test_unreadable_paths(tmp_path):
    with pytest.raises(DecodeError, match="unreadable path: file not found"):
        read_bytes(str(tmp_path / "nope.jpg"))
    with pytest.raises(DecodeError, match="unreadable path: is a directory"):
        read_bytes(str(tmp_path))
    (tmp_path / "a.jpg").write_bytes(ZOO["rgb.jpg"])
    assert read_bytes(f"file://{tmp_path}/a.jpg") == ZOO["rgb.jpg"]


def test_webp_without_support_says_so(monkeypatch):
    real = imagefile.features.check
    monkeypatch.setattr(imagefile.features, "check", lambda f: False if f == "webp" else real(f))
    webp_header = b"RIFF" + (100).to_bytes(4, "little") + b"WEBPVP8 " + bytes(92)
    with pytest.raises(DecodeError, match="^WebP support not compiled in$"):
        decode_rgb(webp_header, (16, 16), CFG)


def test_patchify_layout_is_row_col_channel():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (3 * 4, 5 * 4, 3), dtype=np.uint8)  # grid 3 x 5, patch 4
    tokens = patchify(arr, 4)
    assert tokens.shape == (15, 48)
    for k in range(15):
        r, c = divmod(k, 5)
        assert np.array_equal(tokens[k], arr[r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4].reshape(-1))
    keep = np.array([0, 3, 7, 14])
    sel = select_tokens(arr, 4, keep)
    assert np.array_equal(sel.patches, tokens[keep])
    assert sel.pos_h.tolist() == [0, 0, 1, 2] and sel.pos_w.tolist() == [0, 3, 2, 4]
    assert sel.pos_h.dtype == np.int16
