"""Packing WebDataset and Parquet sources with the real planner: the same images as a folder, as tar
shards and as Parquet give byte-identical shards; 1 vs 2 workers; --resume; images.parquet names
each image's shard/file and member/row; live mode (train --images / serve SOURCE) yields the same
rows; a bad source is one line on stderr with exit code 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from train_fixtures import run_cli

from packer import members, schema
from packer.build.execute import stream_epoch
from packer.build.pipeline import pack
from packer.config import PackConfig
from packer.synth import generate
from packer.synth_formats import generate_as

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg() -> PackConfig:
    return PackConfig.model_validate(
        {
            "packing": {"seq_len": 64, "patch_size": 16, "max_images_per_seq": 8},
            "resolution": {"kind": "uniform", "lo": 64, "hi": 128},
            "output": {"shard_rows": 3},
        }
    )


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.parquet"))}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("srcpack")
    generate(tmp / "folder", n=16, seed=9, threads=1)
    generate_as(tmp / "wds", "wds", n=16, seed=9, shard_size=6, threads=1)
    generate_as(tmp / "parquet", "parquet", n=16, seed=9, shard_size=6, threads=1)
    return {name: tmp / name for name in ("folder", "wds", "parquet")}


@pytest.fixture(scope="module")
def packed(sources, tmp_path_factory, ray_session) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("packed")
    out = {}
    for name, workers in (("folder", 2), ("wds", 1), ("parquet", 2)):
        out[name] = tmp / name
        pack(str(sources[name]), str(out[name]), _cfg(), workers=workers)
    return out


def test_folder_tar_and_parquet_give_byte_identical_shards(packed):
    folder = _shards(packed["folder"])
    assert len(folder) >= 2
    assert _shards(packed["wds"]) == folder  # wds packed with 1 worker, the others with 2
    assert _shards(packed["parquet"]) == folder


@pytest.mark.parametrize(("kind", "container"), [("wds", ".tar"), ("parquet", ".parquet")])
def test_images_parquet_records_shard_and_member(packed, kind, container):
    images = pq.read_table(packed[kind] / schema.IMAGES_FILE).to_pylist()
    assert len(images) == 16 and all(r["rejected_reason"] is None for r in images)
    for r in images:
        loc = members.parse(r["path"])
        where = loc.shard if kind == "wds" else loc.file
        assert where.endswith(container)
        key = loc.member if kind == "wds" else None
        assert key is None or key.split("/")[0] in {
            "checker",
            "circle",
            "cross",
            "square",
            "stripes",
            "triangle",
        }


def test_resume_rebuilds_a_lost_shard_from_tar(sources, packed, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(packed["wds"], out)
    (out / schema.INDEX_FILE).unlink()
    (out / schema.shard_file_name(1)).unlink()
    result = pack(str(sources["wds"]), str(out), _cfg(), workers=2, resume=True)
    assert result.shards_built == 1
    assert _shards(out) == _shards(packed["folder"])


def test_live_rows_from_parquet_equal_the_packed_shards(sources, packed):
    batches = list(stream_epoch(str(sources["parquet"]), _cfg(), 0, workers=2))
    live = pa.Table.from_batches(batches)
    written = pa.concat_tables(pq.read_table(pa.BufferReader(b)) for b in _shards(packed["folder"]).values())
    assert live.equals(written.select(live.column_names))


def test_bad_parquet_source_is_one_line_exit_2(tmp_path, capsys):
    pq.write_table(pa.table({"image": pa.array([1, 2])}), tmp_path / "d.parquet")
    code, out = run_cli(
        ["pack", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o"), "--set", "source.format=parquet"],
        capsys,
    )
    assert code == 2
    errors = [line for line in out.err.splitlines() if line.startswith("error")]
    assert errors == [
        "error: parquet d.parquet: column 'image' is int64, expected binary or struct{bytes, path}"
    ]
    assert "Traceback" not in out.err
    assert not (tmp_path / "o").exists()
