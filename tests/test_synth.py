"""`navit synth`: determinism, class balance, variety of modes/formats, EXIF orientation, size bounds."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from packer.errors import NavitError
from packer.synth import CLASSES, MAX_ASPECT, MAX_SIDE, MIN_SIDE, generate, synth_one


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_byte_identical_per_seed_and_thread_count(tmp_path):
    a = generate(tmp_path / "a", n=40, seed=3, threads=1)
    generate(tmp_path / "b", n=40, seed=3, threads=3)
    generate(tmp_path / "c", n=40, seed=4)
    ta, tb, tc = (_tree_bytes(tmp_path / d) for d in "abc")
    assert len(ta) == 40 == len(a)
    assert ta == tb
    assert ta != tc
    # No temp files left behind by the atomic writes.
    assert not [k for k in ta if ".tmp-" in k]


def test_image_i_does_not_depend_on_n(tmp_path):
    small = generate(tmp_path / "s", n=10, seed=1)
    big = generate(tmp_path / "b", n=30, seed=1)
    assert small == big[:10]


def test_class_balance_and_imagefolder_layout(tmp_path):
    infos = generate(tmp_path, n=60, seed=0)
    counts = Counter(i.label for i in infos)
    assert sorted(counts) == list(range(len(CLASSES)))
    assert max(counts.values()) - min(counts.values()) <= 1
    for info in infos:
        assert info.relpath.split("/")[0] == CLASSES[info.label]
        assert (tmp_path / info.relpath).is_file()


def test_modes_formats_orientations_present_and_files_match():
    seen_modes, seen_formats, seen_orient = set(), set(), set()
    for i in range(200):
        info, data = synth_one(0, i)
        img = Image.open(io.BytesIO(data))
        assert img.format == info.format
        assert img.mode == info.mode
        upright = ImageOps.exif_transpose(img)
        assert upright.size == (info.width, info.height)
        if info.orientation in (6, 8):
            assert img.size == (info.height, info.width)  # stored rotated by a quarter turn
        seen_modes.add(info.mode)
        seen_formats.add(info.format)
        seen_orient.add(info.orientation)
    assert seen_modes == {"RGB", "L", "RGBA", "P"}
    assert seen_formats == {"JPEG", "PNG"}
    assert {3, 6, 8} <= seen_orient


def test_exif_rotated_content_is_upright():
    """The stored pixels, once exif_transpose'd, match the upright rendering (same draws), and match
    it far better than the same content turned half a turn."""
    checked = 0
    for i in range(300):
        info, data = synth_one(5, i)
        if info.orientation == 1 or info.mode != "RGB":
            continue
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), np.int16)
        ref = _reference_render(5, i)
        assert upright.shape[:2] == (ref.height, ref.width)
        err = np.abs(upright - np.asarray(ref, np.int16)).mean()
        err_turned = np.abs(upright - np.asarray(ref.rotate(180), np.int16)).mean()
        assert err < 0.5 * err_turned
        checked += 1
        if checked == 8:
            break
    assert checked == 8


def _reference_render(seed: int, index: int) -> Image.Image:
    """Render image ``index`` with the same draws synth_one makes, without encoding."""
    from packer import synth

    w, h = synth._draw_size(np.random.default_rng([seed, index, 0]))
    return synth._render(np.random.default_rng([seed, index, 1]), CLASSES[index % len(CLASSES)], w, h)


def test_sizes_and_aspect_within_bounds_and_independent_of_label():
    for i in range(150):
        info, _ = synth_one(2, i)
        assert MIN_SIDE <= info.width <= MAX_SIDE and MIN_SIDE <= info.height <= MAX_SIDE
        assert max(info.width, info.height) <= MAX_ASPECT * min(info.width, info.height)
        # The same index with the class list permuted gets another label but the same geometry,
        # format and mode: none of these can reveal the label.
        other, _ = synth_one(2, i, classes=tuple(reversed(CLASSES)))
        assert (other.width, other.height, other.mode, other.format, other.orientation) == (
            info.width,
            info.height,
            info.mode,
            info.format,
            info.orientation,
        )


def test_cli_synth(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "x"), "--n", "12", "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "x").rglob("*.*"))) == 12


# ---------------------------------------------------------------------------------- task "aspect"


def _dark_box(img: Image.Image) -> tuple[int, int, float]:
    """(width, height, fill fraction) of the shape: the box of pixels darker than any background
    pixel (every background channel is >= 150, every shape channel < ASPECT_INK_MAX)."""
    from packer.synth import ASPECT_BG_RANGE

    arr = np.asarray(img.convert("RGB"), np.int16)
    dark = arr.max(-1) < ASPECT_BG_RANGE[0]  # (h, w)
    ys, xs = np.nonzero(dark)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    return int(w), int(h), float(dark.sum()) / (w * h)


def test_aspect_task_shapes_have_their_class_aspect_and_kind():
    from packer.synth import ASPECT_CLASSES, ASPECT_SHAPES, render_upright

    seen = Counter()
    for i in range(120):
        img, label = render_upright(7, i, task="aspect")
        cls = ASPECT_CLASSES[label]
        kind, aspect = ASPECT_SHAPES[cls]
        w, h, fill = _dark_box(img)
        # Whole-pixel rounding of a box at least ~12 px on its short side: within 10 %.
        assert abs(np.log((w / h) / aspect)) < 0.1, (i, cls, w, h)
        if kind == "rect":
            assert fill > 0.99, (i, cls, fill)
        else:  # an ellipse fills pi/4 of its box
            assert 0.72 < fill < 0.84, (i, cls, fill)
        seen[cls] += 1
    assert set(seen) == set(ASPECT_CLASSES) and max(seen.values()) - min(seen.values()) <= 1


def test_aspect_task_geometry_bounds_and_independent_of_label():
    from packer.synth import (
        ASPECT_CLASSES,
        ASPECT_MAX_IMAGE_ASPECT,
        ASPECT_MAX_LONG_SIDE,
        ASPECT_MIN_LONG_SIDE,
    )

    aspects = []
    for i in range(150):
        info, _ = synth_one(3, i, task="aspect")
        assert info.relpath.startswith(ASPECT_CLASSES[info.label] + "/")
        assert ASPECT_MIN_LONG_SIDE - 1 <= max(info.width, info.height) <= ASPECT_MAX_LONG_SIDE + 1
        a = info.width / info.height
        assert 1 / ASPECT_MAX_IMAGE_ASPECT - 0.02 <= a <= ASPECT_MAX_IMAGE_ASPECT + 0.02
        aspects.append(a)
        other, _ = synth_one(3, i, classes=tuple(reversed(ASPECT_CLASSES)), task="aspect")
        # Same index, permuted class list: another class drawn, same geometry, format and mode.
        assert (other.width, other.height, other.mode, other.format, other.orientation) == (
            info.width,
            info.height,
            info.mode,
            info.format,
            info.orientation,
        )
    # Both wide and tall images occur (the image aspect is what square-resizing distorts).
    assert min(aspects) < 0.7 and max(aspects) > 1.4


def test_aspect_task_square_resize_makes_classes_ambiguous():
    """Why NaViT: at the native aspect ratio 'circle' and 'ellipse_tall' are separated (1 vs 1/2),
    but after squashing each image to a square, a circle in a wide image looks as tall as a tall
    ellipse in a square-ish image: the two classes' apparent aspect ranges overlap."""
    from packer.synth import ASPECT_CLASSES, render_upright

    native = {"circle": [], "ellipse_tall": []}
    squashed = {"circle": [], "ellipse_tall": []}
    for i in range(240):
        img, label = render_upright(11, i, task="aspect")
        cls = ASPECT_CLASSES[label]
        if cls not in native:
            continue
        w, h, _ = _dark_box(img)
        native[cls].append(w / h)
        sw, sh, _ = _dark_box(img.resize((128, 128), Image.Resampling.NEAREST))
        squashed[cls].append(sw / sh)
    assert min(native["circle"]) > 0.9 and max(native["ellipse_tall"]) < 0.55
    assert min(squashed["circle"]) < max(squashed["ellipse_tall"])


def test_aspect_task_byte_identical_and_cli(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    a = generate(tmp_path / "a", n=18, seed=2, threads=1, task="aspect")
    generate(tmp_path / "b", n=18, seed=2, threads=3, task="aspect")
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    res = CliRunner().invoke(
        app, ["synth", "--out", str(tmp_path / "c"), "--n", "18", "--seed", "2", "--task", "aspect"]
    )
    assert res.exit_code == 0, res.output
    assert _tree_bytes(tmp_path / "c") == _tree_bytes(tmp_path / "a")
    assert [i.relpath.split("/")[0] for i in a[:6]] == [
        "circle",
        "ellipse_tall",
        "ellipse_wide",
        "rect_tall",
        "rect_wide",
        "square",
    ]
    bad = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d"), "--n", "2", "--task", "nope"])
    # (main() turns a NavitError into one line on stderr and exit code 2.)
    assert isinstance(bad.exception, NavitError) and "--task 'nope'" in str(bad.exception)


def test_unknown_task_or_class_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown synth task"):
        synth_one(0, 0, task="nope")
    with pytest.raises(ValueError, match="has no class"):
        synth_one(0, 0, classes=("checker",), task="aspect")
