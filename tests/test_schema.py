import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from packer import schema
from packer.errors import DataError


def _rows(rng, n_rows=3, seq_len=12, p=2):
    tb = schema.token_bytes(p)
    seg = np.zeros((n_rows, seq_len), np.int16)
    seg[:, :5] = 1
    seg[:, 5:9] = 2
    return schema.PackedRows(
        patches=rng.integers(0, 256, (n_rows, seq_len, tb), dtype=np.uint8),
        segment_ids=seg,
        pos_h=rng.integers(0, 4, (n_rows, seq_len)).astype(np.int16),
        pos_w=rng.integers(0, 4, (n_rows, seq_len)).astype(np.int16),
        image_ids=[np.array([2 * r, 2 * r + 1]) for r in range(n_rows)],
        labels=[np.array([0, -1]) for _ in range(n_rows)],
        grid_h=[np.array([2, 2]) for _ in range(n_rows)],
        grid_w=[np.array([3, 2]) for _ in range(n_rows)],
        tokens_full=[np.array([6, 4]) for _ in range(n_rows)],
    )


def test_round_trip_through_parquet_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    rows = _rows(rng)
    table = schema.rows_to_table(rows, seq_len=12, patch_size=2)
    assert table.schema.equals(schema.shard_schema(12, 2))
    data = schema.table_to_parquet_bytes(table)
    assert data == schema.table_to_parquet_bytes(schema.rows_to_table(rows, 12, 2))  # deterministic bytes
    path = tmp_path / "s.parquet"
    schema.atomic_write_bytes(*schema.resolve_fs(str(path)), data)
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temp file left behind
    back = schema.table_to_arrays(pq.read_table(path))
    np.testing.assert_array_equal(back["patches"], rows.patches)
    np.testing.assert_array_equal(back["segment_ids"], rows.segment_ids)
    np.testing.assert_array_equal(back["pos_w"], rows.pos_w)
    assert [a.tolist() for a in back["image_ids"]] == [a.tolist() for a in rows.image_ids]


def test_read_index_rejects_bad_directories(tmp_path):
    with pytest.raises(DataError, match="no index.json"):
        schema.read_index(str(tmp_path))
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        schema.read_index(str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": schema.FORMAT_NAME, "version": 99}))
    with pytest.raises(DataError, match="version 99 is not supported"):
        schema.read_index(str(tmp_path))


def test_iter_row_groups_resumes_mid_group(tmp_path):
    rows = _rows(np.random.default_rng(1), n_rows=5)
    data = schema.table_to_parquet_bytes(schema.rows_to_table(rows, 12, 2), row_group_rows=2)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.parquet").write_bytes(data)
    got = [t for t in schema.iter_row_groups(str(tmp_path), "shards/a.parquet", ["image_ids"], start_row=3)]
    ids = [i for t in got for i in t.column("image_ids").to_pylist()]
    assert ids == [[6, 7], [8, 9]]
