"""Header scan: sizes after EXIF orientation, no pixel decoded, rejections with reasons, Ray = local."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_images import bad_files, encode, exif_rotated_jpeg, mode_zoo, smooth_rgb, write_files
from PIL import Image, ImageFile

from packer.plan.headers import scan_headers, scan_headers_local

MAX_PIXELS = 89_478_485


def _scan(paths: list[Path]):
    return scan_headers_local(range(len(paths)), [str(p) for p in paths], MAX_PIXELS)


def test_exif_orientation_swaps_width_and_height(tmp_path: Path) -> None:
    upright = smooth_rgb(96, 64)  # 96 wide, 64 high as displayed
    files = write_files(tmp_path, {f"o{o}.jpg": exif_rotated_jpeg(upright, o) for o in (1, 3, 5, 6, 7, 8)})
    names = sorted(files)
    h = _scan([files[n] for n in names])
    assert h.ok.all()
    assert h.orientation.tolist() == [1, 3, 5, 6, 7, 8]
    assert h.width.tolist() == [96] * 6 and h.height.tolist() == [64] * 6
    assert set(h.format) == {"JPEG"}


def test_no_pixel_is_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_files(tmp_path, mode_zoo())
    files.update(write_files(tmp_path, {"t.tif": encode(Image.fromarray(smooth_rgb(30, 20)), "TIFF")}))

    def no_load(self, *a, **k):
        raise AssertionError("pixels decoded during the header scan")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    monkeypatch.setattr(Image.Image, "load", no_load)
    names = sorted(files)
    h = _scan([files[n] for n in names])
    assert h.ok.all(), [r for r in h.reason if r]
    for name, w, hh in zip(names, h.width, h.height, strict=True):
        assert (w, hh) == ((30, 20) if name == "t.tif" else (96, 64)), name


def test_bad_files_are_rejected_with_reasons(tmp_path: Path) -> None:
    files = write_files(tmp_path, bad_files())
    files["missing.jpg"] = tmp_path / "missing.jpg"
    names = sorted(files)
    h = _scan([files[n] for n in names])
    reason = dict(zip(names, h.reason, strict=True))
    assert reason["zero.jpg"] == "zero-byte file"
    assert reason["text.jpg"].startswith("not an image")
    assert reason["garbage.png"].startswith("not an image")
    assert reason["bomb.png"].startswith("decompression bomb")
    assert reason["missing.jpg"] == "unreadable path: file not found"
    # Its header is intact: the truncation is only found when decoding (navit pack rejects it).
    assert reason["truncated.jpg"] == ""
    bad = ~h.ok
    assert (h.width[bad] == -1).all() and (h.height[bad] == -1).all()


def test_pixel_limit_comes_from_the_config(tmp_path: Path) -> None:
    files = write_files(tmp_path, {"a.png": encode(Image.fromarray(smooth_rgb(40, 30)), "PNG")})
    h = scan_headers_local([0], [str(files["a.png"])], max_pixels=1000)
    assert h.reason[0] == "decompression bomb: 40x30 = 1200 pixels > decode.max_pixels (1000)"


def test_webp_not_compiled_in_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import packer.imagefile

    data = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 40
    files = write_files(tmp_path, {"x.webp": data})
    real = packer.imagefile.features.check
    monkeypatch.setattr(packer.imagefile.features, "check", lambda f: False if f == "webp" else real(f))
    assert _scan([files["x.webp"]]).reason == ["WebP support not compiled in"]


@pytest.mark.slow
def test_ray_scan_equals_local_for_1_and_2_workers(tmp_path: Path, ray_session) -> None:
    files = write_files(tmp_path, {**mode_zoo(), **bad_files()})
    for i in range(20):
        img = Image.fromarray(smooth_rgb(20 + 7 * i, 90 - 3 * i, seed=i))
        files.update(write_files(tmp_path, {f"g{i:02d}.png": encode(img, "PNG")}))
    names = sorted(files)
    paths = [str(files[n]) for n in names]
    ids = np.arange(len(paths)) * 3 + 5  # any increasing ids
    local = scan_headers_local(ids, paths, MAX_PIXELS)
    for workers in (1, 2):
        r = scan_headers(ids, paths, MAX_PIXELS, workers=workers, use_ray=True)
        for field in ("image_id", "width", "height", "orientation"):
            np.testing.assert_array_equal(getattr(r, field), getattr(local, field), err_msg=field)
        assert r.format == local.format and r.reason == local.reason


def test_bomb_reason_does_not_depend_on_an_earlier_scan_in_the_process(tmp_path: Path) -> None:
    # Pillow's decompression-bomb limit is a process-wide global. A scan with a large
    # decode.max_pixels used to lift it for good, so a later scan in the same process (but not a
    # fresh Ray worker) worded the same rejection differently: plans differed by process history.
    files = write_files(tmp_path, {"a.png": encode(Image.fromarray(smooth_rgb(40, 30)), "PNG")})
    limit_before = Image.MAX_IMAGE_PIXELS
    first = scan_headers_local([0], [str(files["a.png"])], max_pixels=500).reason[0]
    scan_headers_local([0], [str(files["a.png"])], max_pixels=10**12)
    again = scan_headers_local([0], [str(files["a.png"])], max_pixels=500).reason[0]
    assert first == again
    assert limit_before == Image.MAX_IMAGE_PIXELS  # other Pillow users in the process are left alone
    assert first.startswith("decompression bomb: more than 1000 pixels (Pillow's hard limit")
