"""Integrity on every read path (issues 20 and 21): a flipped byte in a shard's pixels, or corrupt
metadata, must be reported in one line by `stats`, `inspect`, `serve` (without --verify), the
trainer (with data.verify off) and a Flight client — never read silently, never used to size an
allocation. And the writer must write what the docs say (zstd metadata columns, page checksums).

Before the fixes: the metadata columns were written uncompressed with no page checksum, a flipped
pixel byte was seen only by a sha256 check (train with verify, serve --verify), stats said
"consistency: OK" for a label of 3.6e16, inspect sized its canvas from a corrupt grid_h, and a
Flight client had nothing to check its rows against.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packfixture import random_image, write_pack
from typer.testing import CliRunner

from packer import schema
from packer.errors import DataError

P, SEQ_LEN = 4, 16
CLASSES = ["a", "b"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    images = [
        random_image(rng, 2, 3, P, label=0),
        random_image(rng, 3, 3, P, label=1, keep=np.array([0, 2, 4, 8])),
        random_image(rng, 1, 4, P, label=-1),
        random_image(rng, 2, 2, P, label=1),
        random_image(rng, 2, 4, P, label=0),
    ]
    out = tmp_path_factory.mktemp("integrity") / "pack"
    out.mkdir()
    write_pack(out, images, [[[0, 1], [2, 3], [4]]], SEQ_LEN, P, shard_rows=3, classes=CLASSES)
    return out


@pytest.fixture()
def pack(good, tmp_path) -> Path:
    copy = tmp_path / "pack"
    shutil.copytree(good, copy)
    return copy


def _flip_pixel_byte(pack: Path, shard: int = 0) -> None:
    """Flip one byte inside the pixel data of row group 0's `patches` page (header and footer intact)."""
    f = pack / schema.shard_file_name(shard)
    col = pq.ParquetFile(f).metadata.row_group(0).column(0)
    assert col.path_in_schema == "patches"
    data = bytearray(f.read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 7] ^= 0x10
    f.write_bytes(bytes(data))


def _rewrite(pack: Path, column: str, value: int) -> None:
    """Shard 0 rewritten with the first segment's ``column`` set to ``value`` and its sha256
    updated in index.json: corruption that happened before the checksum was taken, so only the
    bounds checks can see it."""
    name = schema.shard_file_name(0)
    table = pq.read_table(pack / name)
    values = table.column(column).to_pylist()
    values[0][0] = value
    field = table.schema.field(column)
    table = table.set_column(table.schema.get_field_index(column), field, pa.array(values, field.type))
    data = schema.table_to_parquet_bytes(table.replace_schema_metadata(table.schema.metadata), 2)
    (pack / name).write_bytes(data)
    index = json.loads((pack / schema.INDEX_FILE).read_text())
    index["shards"][0]["sha256"] = schema.sha256_bytes(data)
    (pack / schema.INDEX_FILE).write_bytes(schema.dumps_index(index))


def _cli(*args: str):
    from cli.main import app

    return CliRunner().invoke(app, list(args))


# ----------------------------------------------------------------------------------------------------
# The writer
# ----------------------------------------------------------------------------------------------------


def test_metadata_columns_are_zstd_and_pages_carry_checksums(good):
    md = pq.ParquetFile(good / schema.shard_file_name(0)).metadata
    codecs = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i).compression
              for i in range(md.num_columns)}  # fmt: skip
    assert codecs.pop("patches") == "UNCOMPRESSED"
    assert len(codecs) == 8 and set(codecs.values()) == {"ZSTD"}, codecs
    data = bytearray((good / schema.shard_file_name(0)).read_bytes())
    col = md.row_group(0).column(0)
    data[col.data_page_offset + col.total_compressed_size - 7] ^= 0x10
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.ParquetFile(io.BytesIO(bytes(data)), page_checksum_verification=True).read_row_group(0)


# ----------------------------------------------------------------------------------------------------
# A flipped pixel byte
# ----------------------------------------------------------------------------------------------------


def test_flipped_pixel_byte_is_reported_by_every_reader(pack):
    from packer.analysis.row_view import read_row
    from packer.serve.epochs import ShardSetSource
    from trainer.shards import _RowReader, open_shard_set

    _flip_pixel_byte(pack)
    res = _cli("stats", str(pack))
    assert res.exit_code == 1
    warnings = [x for x in res.stderr.splitlines() if x.startswith("WARNING")]
    assert warnings == [
        f"WARNING: {pack}: shards/shard-000000.parquet: checksum mismatch (the file changed or is corrupt "
        "since it was packed)"
    ], res.stderr
    with pytest.raises(DataError, match=r"shard-000000.parquet: cannot read row 0 \(.*CRC"):
        read_row(str(pack), 0)
    source = ShardSetSource(str(pack))  # serve without --verify
    with pytest.raises(DataError, match=r"shard-000000.parquet: cannot read row group 0 \(.*CRC"):
        list(source.stream(0, 0, source.epoch_rows(0)))
    reader = _RowReader(open_shard_set(str(pack), verify=False))  # train with data.verify off
    with pytest.raises(DataError, match=r"shard-000000.parquet: row group 0 unreadable \(.*CRC"):
        reader.get(0, 0)


def test_flight_client_checks_each_rows_crc32(good, monkeypatch):
    from packer.serve import flight
    from packer.serve.epochs import ShardSetSource
    from trainer.flight_client import FlightDataClient

    server = flight.make_server(ShardSetSource(str(good)), host="127.0.0.1", port=0)
    try:
        uri = f"flight://127.0.0.1:{server.port}"
        with FlightDataClient(uri) as client:
            rows = sum(b.num_rows for b in client.batches(0))
        assert rows == 3

        honest = flight.with_row_crcs

        def damaged_in_transit(batches):  # the CRCs no longer match the rows the client receives
            for batch, meta in honest(batches):
                crcs = json.loads(meta)["navit_row_crc32"]
                yield batch, json.dumps({"navit_row_crc32": [crcs[0] ^ 1, *crcs[1:]]}).encode()

        monkeypatch.setattr(flight, "with_row_crcs", damaged_in_transit)
        with (
            FlightDataClient(uri) as client,
            pytest.raises(DataError, match="row 0 of the batch fails its CRC32"),
        ):
            list(client.batches(0, retries=0))
    finally:
        server.shutdown()


# ----------------------------------------------------------------------------------------------------
# Corrupt metadata
# ----------------------------------------------------------------------------------------------------

CORRUPT = {
    "grid_h": ("grid_h", 4096, r"grid 4096x3 with tokens_full 6"),
    "label": (
        "labels",
        36_000_000_000_000_000,
        r"label 36000000000000000 is out of range \(-1..1: 2 classes\)",
    ),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_metadata_is_one_line_on_every_read_path(pack, case):
    from packer.analysis.load import load_pack
    from packer.analysis.row_view import read_row
    from packer.serve.epochs import ShardSetSource
    from trainer.shards import _RowReader, open_shard_set

    column, value, says = CORRUPT[case]
    _rewrite(pack, column, value)
    where = r"shard-000000.parquet.*row 0 segment 1: " + says
    with pytest.raises(DataError, match=where):
        read_row(str(pack), 0)  # inspect: before anything is sized from the grid
    problems = load_pack(str(pack)).problems  # stats, sha256 included (it matches)
    assert len(problems) >= 1 and "corrupt shard metadata" in problems[0], problems
    res = _cli("stats", str(pack), "--json")
    assert res.exit_code == 1 and not json.loads(res.stdout)["consistency"]["ok"]
    with pytest.raises(DataError, match=says):  # serve without --verify: at start-up or on the stream
        source = ShardSetSource(str(pack))
        list(source.stream(0, 0, source.epoch_rows(0)))
    with pytest.raises(DataError, match=says):  # train with data.verify off: the head is never sized
        _RowReader(open_shard_set(str(pack), verify=False)).get(0, 0)
    from trainer.flight_client import _check_batch

    batch = pq.read_table(pack / schema.shard_file_name(0)).to_batches()[0]
    limits = schema.RowLimits(seq_len=SEQ_LEN)  # a Flight client knows only the stream's geometry
    if case == "grid_h":  # (a label is in range for a client that has no class list)
        with pytest.raises(DataError, match=says):
            _check_batch(batch, None, limits, "flight://x")


def test_bounds_accept_every_row_navit_writes(good):
    table = pq.read_table(good / schema.shard_file_name(0))
    index = schema.read_index(str(good))
    assert schema.row_problem(table, schema.RowLimits.from_index(index)) is None
    assert (
        schema.check_crc_metadata(table.to_batches()[0], schema.crc_metadata(table.to_batches()[0])) is None
    )
