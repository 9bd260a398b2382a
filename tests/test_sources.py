"""Source listing: directory trees (labels, extensions, hidden/other files), manifests, URIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from packer.config import SourceConfig
from packer.errors import NavitError
from packer.plan.sources import DUPLICATE_REASON, list_source


def _touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for rel in (
        "dog/b.JPG",
        "dog/a.jpeg",
        "cat/deep/nested/c.PnG",
        "cat/d.webp",
        "bird/e.TIFF",
        "top.png",  # directly under the root: unlabeled
        "cat/.hidden.jpg",
        ".cache/f.jpg",
        "dog/notes.txt",
        "README",
    ):
        _touch(root, rel)
    return root


def test_directory_labels_extensions_and_skips(tree: Path) -> None:
    lst = list_source(str(tree))
    assert lst.keys == sorted(lst.keys)
    assert lst.keys == [
        "bird/e.TIFF",
        "cat/d.webp",
        "cat/deep/nested/c.PnG",
        "dog/a.jpeg",
        "dog/b.JPG",
        "top.png",
    ]
    assert lst.classes == ["bird", "cat", "dog"]
    assert lst.labels.tolist() == [0, 1, 1, 2, 2, -1]
    assert lst.paths[0] == str(tree / "bird" / "e.TIFF")
    reasons = {Path(s.path).name: s.reason for s in lst.skipped}
    assert reasons[".hidden.jpg"] == "hidden file"
    assert reasons[".cache"] == "hidden folder"
    assert reasons["notes.txt"].startswith("not an image extension")
    assert reasons["README"].startswith("not an image extension")
    assert not lst.rejected and lst.valid.all()


def test_directory_unlabeled_and_follow_hidden(tree: Path) -> None:
    lst = list_source(str(tree), SourceConfig(labels="none", follow_hidden=True))
    assert (lst.labels == -1).all() and lst.classes == []
    assert ".cache/f.jpg" in lst.keys and "cat/.hidden.jpg" in lst.keys


def test_file_uri_lists_the_same_as_a_path(tree: Path) -> None:
    a = list_source(str(tree))
    b = list_source(tree.resolve().as_uri())
    assert a.keys == b.keys and a.paths == b.paths and a.classes == b.classes
    np.testing.assert_array_equal(a.labels, b.labels)


def test_missing_source_is_one_line_error(tmp_path: Path) -> None:
    for src in (str(tmp_path / "nope"), (tmp_path / "nope").as_uri(), str(tmp_path / "m.csv")):
        with pytest.raises(NavitError, match="source not found"):
            list_source(src)
    f = _touch(tmp_path, "plain.bin")
    with pytest.raises(NavitError, match="not a directory or a manifest"):
        list_source(str(f))


def test_manifest_csv_string_labels_relative_paths_and_duplicates(tmp_path: Path) -> None:
    man = tmp_path / "sub" / "m.csv"
    man.parent.mkdir()
    absolute = str(tmp_path / "abs" / "z.png")
    man.write_text(
        "path,label\n"
        f"b/x.jpg,zebra\n"
        f"a/y.png,ant\n"
        f"{absolute},ant\n"
        f"./b/x.jpg,zebra\n"  # the same file as row 1 → rejected
        f"c/notes.txt,ant\n"
    )
    lst = list_source(str(man))
    assert lst.classes == ["ant", "zebra"]
    assert len(lst) == 5
    by_key = dict(zip(lst.keys, zip(lst.paths, lst.labels.tolist(), strict=True), strict=True))
    assert by_key["a/y.png"] == (str(tmp_path / "sub" / "a" / "y.png"), 0)
    assert by_key["b/x.jpg"] == (str(tmp_path / "sub" / "b" / "x.jpg"), 1)
    assert absolute in lst.paths
    reasons = sorted(r.reason for r in lst.rejected)
    assert reasons == [DUPLICATE_REASON, "not an image extension: .txt"]
    dup = next(r for r in lst.rejected if r.reason == DUPLICATE_REASON)
    assert dup.path == str(tmp_path / "sub" / "b" / "x.jpg")
    assert lst.valid.sum() == 3
    ids = sorted(r.image_id for r in lst.rejected)
    assert len(set(ids)) == 2 and all(0 <= i < 5 for i in ids)


def test_manifest_jsonl_int_labels_and_parquet(tmp_path: Path) -> None:
    rows = [
        {"path": "q/1.jpg", "label": 3},
        {"path": "p/2.png", "label": None},
        {"path": "r/3.gif", "label": 0},
    ]
    jl = tmp_path / "m.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a = list_source(str(jl))
    assert a.keys == ["p/2.png", "q/1.jpg", "r/3.gif"]
    assert a.labels.tolist() == [-1, 3, 0] and a.classes == []
    pqf = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [r["path"] for r in rows], "label": [r["label"] for r in rows]}), pqf)
    b = list_source(str(pqf))
    assert b.keys == a.keys and b.labels.tolist() == a.labels.tolist() and b.paths == a.paths
    nolabel = tmp_path / "n.csv"
    nolabel.write_text("path\nx.jpg\n")
    assert list_source(str(nolabel)).labels.tolist() == [-1]


def test_manifest_without_path_column(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("file,label\nx.jpg,a\n")
    with pytest.raises(NavitError, match="no 'path' column"):
        list_source(str(m))
