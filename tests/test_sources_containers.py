"""WebDataset tar shards and Parquet image-bytes sources: listing, labels, locators, rejections and
one-line errors (no Ray here; packing them is tests/test_sources_pack.py)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from packer import members
from packer.build import decode
from packer.config import PackConfig, SourceConfig
from packer.errors import NavitError
from packer.plan.headers import read_header
from packer.plan.planner import scan_source
from packer.plan.sources import list_source
from packer.synth import generate
from packer.synth_formats import generate_as


def _jpeg(w: int = 40, h: int = 24, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The same 14 synthetic images as a folder, as 3 tar shards and as 3 Parquet files."""
    tmp = tmp_path_factory.mktemp("layouts")
    generate(tmp / "folder", n=14, seed=5, threads=1)
    generate_as(tmp / "wds", "wds", n=14, seed=5, shard_size=5, threads=1)
    generate_as(tmp / "parquet", "parquet", n=14, seed=5, shard_size=5, threads=1)
    return {name: tmp / name for name in ("folder", "wds", "parquet")}


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_listing_has_the_folder_keys_labels_and_bytes(layouts, kind):
    folder = list_source(str(layouts["folder"]))
    listing = list_source(str(layouts[kind]))
    assert listing.keys == folder.keys  # normalised keys: same draws, same plan
    assert listing.labels.tolist() == folder.labels.tolist()
    assert not listing.rejected and len(listing) == 14
    prefix = "tar:" if kind == "wds" else "parquet:"
    assert all(p.startswith(prefix) for p in listing.paths)
    for key, loc, path in zip(folder.keys, listing.paths, folder.paths, strict=True):
        assert decode.read_bytes(loc) == Path(path).read_bytes(), key  # by offset / by row group
        assert read_header(loc, 10**8) == read_header(path, 10**8)


def test_patterns_select_shards_and_a_missing_shard_is_one_line(layouts):
    wds = layouts["wds"]
    two = list_source(str(wds / "shard-{000000..000001}.tar"))
    assert len(two) == 10
    assert len(list_source(str(wds / "shard-*.tar"))) == 14
    assert len(list_source(str(wds / "shard-000002.tar"))) == 4
    assert len(list_source(str(layouts["parquet"] / "part-{000000,000002}.parquet"))) == 9
    with pytest.raises(NavitError, match=r"shard-000003.tar not found \(and 6 more\)$"):
        list_source(str(wds / "shard-{000001..000009}.tar"))
    with pytest.raises(NavitError, match="no file matches"):
        list_source(str(wds / "nothing-*.tar"))


def test_wds_rejections_are_recorded_with_reasons(tmp_path):
    good, other = _jpeg(), _jpeg(colour=(0, 0, 200))
    _tar(
        tmp_path / "a.tar",
        [
            ("x/0001.jpg", good),
            ("x/0001.cls", b"1"),
            ("x/0002.json", json.dumps({"label": 7}).encode()),  # no image member
            ("x/0003.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 8),  # an image member that does not decode
            ("x/0004.jpg", good),
            ("x/0004.json", json.dumps({"label": "x"}).encode()),  # a name among integers
        ],
    )
    _tar(tmp_path / "b.tar", [("x/0001.jpg", other), ("x/0005.jpg", good), ("x/0005.cls", b"2")])
    # c.tar: a good member, then a damaged header, then a member that tarfile never reaches.
    _tar(tmp_path / "c.tar", [("y/0006.jpg", good), ("y/0007.jpg", good)])
    data = bytearray((tmp_path / "c.tar").read_bytes())
    second = 512 + -(-len(good) // 512) * 512
    data[second : second + 100] = b"\xff" * 100
    (tmp_path / "c.tar").write_bytes(bytes(data))
    # d.tar: its last member cut short.
    _tar(tmp_path / "d.tar", [("z/0008.jpg", good), ("z/0009.jpg", good)])
    (tmp_path / "d.tar").write_bytes((tmp_path / "d.tar").read_bytes()[: second + 512 + 100])

    with pytest.raises(NavitError, match="labels mix integers and class names"):
        list_source(str(tmp_path / "*.tar"))
    cfg = PackConfig.model_validate({"source": {"labels": "folder", "label_field": "nope"}})
    scan = scan_source(str(tmp_path / "*.tar"), cfg, use_ray=False)
    listing, headers = scan.listing, scan.headers
    by_key = {k: headers.reason[i] for i, k in reversed(list(enumerate(listing.keys)))}  # first wins
    assert by_key["x/0001.jpg"] == "" and by_key["x/0004.jpg"] == ""
    assert listing.labels[listing.keys.index("x/0001.jpg")] == 1
    assert listing.labels[listing.keys.index("x/0004.jpg")] == -1  # no field "nope": unlabeled
    assert by_key["x/0002"].startswith("no image member in sample (members: .json)")
    assert by_key["x/0003.png"] == "not an image (unrecognised file format)"
    dups = [headers.reason[i] for i, k in enumerate(listing.keys) if k == "x/0001.jpg"]
    assert dups[0] == "" and dups[1].startswith("duplicate key: also in ") and dups[1].endswith("a.tar")
    assert by_key["y/0006.jpg"] == ""
    assert by_key["c.tar/"].startswith("corrupt tar: invalid header at byte")
    assert by_key["z/0008.jpg"] == ""
    assert by_key["z/0009.jpg"].startswith("truncated tar member: 100 of")
    # Every input is accounted for: in the plan or rejected with a reason.
    assert len(listing) == len(headers.reason) == 10


def test_a_file_that_is_not_a_tar_is_one_rejected_shard(tmp_path):
    _tar(tmp_path / "ok.tar", [("a.jpg", _jpeg())])
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar archive at all" * 40)
    listing = list_source(str(tmp_path))
    assert listing.keys == ["a.jpg", "bad.tar/"]
    assert [r.reason.split(":")[0] for r in listing.rejected] == ["corrupt tar"]


def _parquet(path: Path, image: pa.Array, label: pa.Array | None = None, **extra) -> Path:
    cols = {"image": image, **extra}
    if label is not None:
        cols["label"] = label
    pq.write_table(pa.table(cols), path, row_group_size=2)
    return path


def test_parquet_struct_and_binary_columns_labels_and_null_bytes(tmp_path):
    a, b = _jpeg(), _jpeg(30, 50)
    (tmp_path / "side.jpg").write_bytes(b)
    struct = pa.array(
        [
            {"bytes": a, "path": "cat/1.jpg"},
            {"bytes": None, "path": "side.jpg"},  # null bytes: read the path (next to the file)
            {"bytes": None, "path": None},  # nothing to read
            {"bytes": a, "path": "cat/1.jpg"},  # duplicate key
            {"bytes": a, "path": None},  # no path: key FILE#ROW
        ]
    )
    _parquet(tmp_path / "s.parquet", struct, pa.array(["cat", "dog", None, "cat", "dog"]))
    scan = scan_source(str(tmp_path / "s.parquet"), PackConfig(), use_ray=False)
    listing, headers = scan.listing, scan.headers
    assert listing.keys == ["cat/1.jpg", "cat/1.jpg", "s.parquet#2", "s.parquet#4", "side.jpg"]
    assert listing.classes == ["cat", "dog"] and listing.labels.tolist() == [0, 0, -1, 1, 1]
    assert headers.reason[0] == "" and headers.reason[1].startswith("duplicate key: also ")
    assert headers.reason[2] == "null image bytes and no path"
    assert headers.reason[3] == "" and headers.reason[4] == ""
    assert (headers.width[4], headers.height[4]) == (30, 50)
    assert decode.read_bytes(listing.paths[4]) == b

    _parquet(tmp_path / "bin.parquet", pa.array([a, b], pa.binary()), pa.array([3, None], pa.int32()))
    listing = list_source(str(tmp_path / "bin.parquet"))
    assert listing.keys == ["bin.parquet#0", "bin.parquet#1"] and listing.labels.tolist() == [3, -1]
    assert [decode.read_bytes(p) for p in listing.paths] == [a, b]


@pytest.mark.parametrize(
    ("image", "label", "cfg", "message"),
    [
        (
            pa.array(["x.jpg"]),
            None,
            {},
            r"column 'image' is string, expected binary or struct\{bytes, path\}",
        ),
        (pa.array([b"x"]), pa.array([1.5]), {}, "label column 'label' is double, expected an integer"),
        (pa.array([b"x"]), None, {"image_column": "img"}, "no image column 'img' \\(columns: image\\)"),
    ],
)
def test_parquet_wrong_columns_are_one_line_errors(tmp_path, image, label, cfg, message):
    path = _parquet(tmp_path / "d.parquet", image, label)
    with pytest.raises(NavitError, match=message) as err:
        list_source(str(path), SourceConfig(format="parquet", **cfg))
    assert "\n" not in str(err.value)


def test_a_parquet_manifest_is_still_a_manifest(tmp_path, layouts):
    folder = list_source(str(layouts["folder"]))
    pq.write_table(pa.table({"path": folder.paths}), tmp_path / "m.parquet")
    listing = list_source(str(tmp_path / "m.parquet"))
    assert listing.paths == folder.paths  # no image column: a manifest of paths


def test_row_group_reads_are_grouped(layouts, monkeypatch):
    """A shard task reads each Parquet row group once, not once per image."""
    calls = []
    real = members._row_group_values
    monkeypatch.setattr(members, "_row_group_values", lambda *a: calls.append(a) or real(*a))
    listing = list_source(str(layouts["parquet"]))
    shuffled = [listing.paths[i] for i in np.random.default_rng(0).permutation(len(listing))]
    got = members.read_many(shuffled)
    assert (
        sorted(got) == sorted(listing.paths) and len(calls) == len(set(calls)) == 3
    )  # 3 files, 1 row group each


class _CountingRemote:
    """A local file that looks like a pyarrow object-store file (read_at/size): counts requests."""

    requests = 0

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 (closed by close())

    def size(self) -> int:
        return os.fstat(self._f.fileno()).st_size

    def read_at(self, n: int, offset: int) -> bytes:
        type(self).requests += 1
        self._f.seek(offset)
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_remote_tar_members_are_fetched_in_merged_ranged_reads(layouts, monkeypatch):
    local = list_source(str(layouts["wds"]))
    expected = {p: decode.read_bytes(p) for p in local.paths}
    monkeypatch.setattr(members, "open_random_access", _CountingRemote)
    _CountingRemote.requests = 0
    got = members.read_many(local.paths)
    assert got == expected
    assert _CountingRemote.requests == 3  # one ranged read per shard, not one per member
