"""`navit inspect`: rebuilt images equal the source's kept patches, global row numbering, the PNG
and the text summary, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from packfixture import FixImage, random_image, write_pack
from typer.testing import CliRunner

from cli.main import app
from packer.analysis.row_view import DPI, DROPPED_RGB, figure_size, read_row, reconstruct_row
from packer.errors import DataError

SEQ_LEN, P = 20, 3
CLASSES = ["cat", "dog"]
EPOCHS = [[[0, 1], [2]], [[3, 2, 0], [1]]]


def images() -> list[FixImage]:
    rng = np.random.default_rng(3)
    return [
        random_image(rng, 2, 3, P, label=0),  # 6 tokens, all kept
        random_image(rng, 3, 4, P, label=1, keep=np.array([0, 3, 5, 6, 11])),  # 5 of 12
        random_image(rng, 1, 5, P, label=-1),  # 5 tokens
        random_image(rng, 4, 1, P, label=1, keep=np.array([2])),  # 1 of 4
    ]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "pack"
    out.mkdir()
    write_pack(out, images(), EPOCHS, SEQ_LEN, P, shard_rows=1, classes=CLASSES)
    return out


def expected_canvas(im: FixImage) -> tuple[np.ndarray, np.ndarray]:
    """The source image with every dropped patch painted DROPPED_RGB, and the kept mask."""
    gh, gw = im.grid(P)
    mask = np.zeros(gh * gw, bool)
    mask[im.kept(P)] = True
    mask = mask.reshape(gh, gw)
    canvas = im.pixels.copy()
    for r, c in zip(*np.nonzero(~mask), strict=True):
        canvas[r * P : (r + 1) * P, c * P : (c + 1) * P] = DROPPED_RGB
    return canvas, mask


@pytest.mark.parametrize("row", range(4))
def test_reconstruction_equals_source_kept_patches(pack, row):
    src = images()
    members = [m for e in EPOCHS for m in e][row]
    v = read_row(str(pack), row)
    assert [s.image_id for s in v.segments] == members
    for s, i in zip(v.segments, members, strict=True):
        canvas, mask = expected_canvas(src[i])
        np.testing.assert_array_equal(s.mask, mask)
        np.testing.assert_array_equal(s.canvas, canvas)
        assert (s.kept, s.full) == (int(mask.sum()), mask.size)
        assert (s.grid_h, s.grid_w) == src[i].grid(P)
    assert v.padding == SEQ_LEN - sum(int(src[i].kept(P).size) for i in members)


def test_global_row_and_shard_row_agree(pack):
    # shard_rows=1: global row 2 is the first row of shard 2 (epoch 1).
    a, b = read_row(str(pack), 2), read_row(str(pack), 0, shard=2)
    assert (a.shard, a.row_in_shard, a.epoch) == (2, 0, 1)
    assert [s.image_id for s in a.segments] == [s.image_id for s in b.segments] == [3, 2, 0]
    assert b.global_row == 2


def test_reconstruct_rejects_bad_positions():
    seg = np.array([1, 1, 0], np.int16)
    patches = np.zeros((3, P * P * 3), np.uint8)
    with pytest.raises(DataError, match="same"):
        reconstruct_row(patches, seg, np.zeros(3), np.zeros(3), np.array([1]), np.array([2]), P)
    with pytest.raises(DataError, match="outside"):
        reconstruct_row(patches, seg, np.array([0, 1, 0]), np.zeros(3), np.array([1]), np.array([2]), P)


def test_cli_summary_and_png(tmp_path, pack):
    res = CliRunner().invoke(app, ["inspect", str(pack), "--row", "2"])
    assert res.exit_code == 0, res.output
    assert "dog (1)" in res.output and "unlabeled" in res.output and "cat (0)" in res.output
    pad = SEQ_LEN - (1 + 5 + 6)  # images 3, 2, 0 keep 1, 5 and 6 tokens
    assert "1/4" in res.output and f"padding: {pad} tokens" in res.output
    out = tmp_path / "row.png"
    res = CliRunner().invoke(app, ["inspect", str(pack), "--row", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    from PIL import Image

    w, h, _, _ = figure_size(3)
    with Image.open(out) as im:
        assert im.size == (round(w * DPI), round(h * DPI))


def test_row_out_of_range_is_one_line_error(pack):
    res = CliRunner().invoke(app, ["inspect", str(pack), "--row", "4"])
    assert res.exit_code != 0
    assert isinstance(res.exception, DataError) and "out of range" in str(res.exception)
    with pytest.raises(DataError, match="shard 0 has 1 rows"):
        read_row(str(pack), 1, shard=0)


@pytest.mark.parametrize("how", ["truncated", "corrupt page"])
def test_damaged_shard_is_one_line_error(pack, tmp_path, how):
    """Issue 12 item 5: a truncated shard (no footer) or a damaged page → DataError, exit code 2."""
    import shutil

    import pyarrow.parquet as pq

    from packer import schema

    bad = tmp_path / "bad"
    shutil.copytree(pack, bad)
    f = bad / schema.shard_file_name(2)  # holds global row 2
    data = bytearray(f.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    else:
        names = [c.path for c in pq.ParquetFile(f).metadata.schema]
        col = pq.ParquetFile(f).metadata.row_group(0).column(names.index("segment_ids.list.element"))
        data[col.data_page_offset : col.data_page_offset + 8] = b"\xff" * 8
    f.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000002.parquet: cannot read row 0") as e:
        read_row(str(bad), 2)
    assert "\n" not in str(e.value)
    res = CliRunner().invoke(app, ["inspect", str(bad), "--row", "2"])
    assert isinstance(res.exception, DataError)
