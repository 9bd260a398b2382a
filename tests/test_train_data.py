"""trainer.data: split across ranks and workers, deterministic shuffling, epochs, positions, batch
format, and one-line errors for bad pack directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import make_images, write_pack

from packer import schema
from packer.errors import DataError, NavitError
from trainer.batch import DataPosition
from trainer.data import iter_batches
from trainer.shards import ShardSource, ShardStream, open_shard_set, rank_epoch_rows, shuffle_buffer_order
from trainer.streams import RecordBatchSource


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads that
    # spin-wait for each other make every op many times slower: use one, restore afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    images, labels = make_images(120, seed=1)
    return write_pack(tmp_path_factory.mktemp("pack") / "p", images, labels, epochs=2, shard_rows=5)


def _all_rows(shards, pack_epoch: int) -> set[tuple[int, int]]:
    return {
        (s, r)
        for s in range(len(shards.files))
        if shards.shard_epoch[s] == pack_epoch
        for r in range(shards.shard_rows(s))
    }


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_disjoint_and_complete(pack, world):
    shards = open_shard_set(str(pack))
    for epoch in range(3):
        parts = [
            [tuple(x) for x in rank_epoch_rows(shards, epoch, 5, r, world, 16).tolist()] for r in range(world)
        ]
        flat = [x for p in parts for x in p]
        assert len(flat) == len(set(flat)), "a row went to two ranks"
        assert set(flat) == _all_rows(shards, epoch % 2), "a row went to no rank"
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 2 * 4  # balanced to within a row group or two


def test_shuffle_is_pure_function_of_seed_and_epoch(pack):
    shards = open_shard_set(str(pack))
    a = rank_epoch_rows(shards, 0, 3, 0, 1, 16)
    assert np.array_equal(a, rank_epoch_rows(shards, 0, 3, 0, 1, 16))
    assert not np.array_equal(a, rank_epoch_rows(shards, 0, 4, 0, 1, 16))  # other seed
    # Epoch 2 reads the same pack epoch as epoch 0 but in another order.
    c = rank_epoch_rows(shards, 2, 3, 0, 1, 16)
    assert set(map(tuple, c.tolist())) == set(map(tuple, a.tolist()))
    assert not np.array_equal(a, c)


def test_shuffle_buffer_is_bounded_permutation():
    rng = np.random.default_rng(0)
    order = shuffle_buffer_order(1000, 32, rng)
    assert sorted(order.tolist()) == list(range(1000))
    # Item i can leave the buffer no earlier than output position i - buffer.
    pos = np.empty(1000, int)
    pos[order] = np.arange(1000)
    assert (pos >= np.arange(1000) - 32).all()
    assert not np.array_equal(order, np.arange(1000))


def _collect(stream_batches, n):
    out = []
    for b in stream_batches:
        out.append(b)
        if len(out) == n:
            break
    return out


def _same(a, b) -> bool:
    return a.position == b.position and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_workers_give_the_same_batches_as_in_process(pack):
    shards = open_shard_set(str(pack))
    ref = _collect(ShardSource(shards, 3, seed=1, shuffle_buffer=8).batches(), 12)
    two = _collect(ShardSource(shards, 3, seed=1, shuffle_buffer=8, workers=2, prefetch=1).batches(), 12)
    assert all(_same(a, b) for a, b in zip(ref, two, strict=True))
    # Every row of epoch 0 is seen once before any row repeats (complete and disjoint).
    n0 = sum(shards.shard_rows(s) for s in range(len(shards.files)) if shards.shard_epoch[s] == 0)
    ids = [
        tuple(x)
        for b in ref
        for x in b.tensors["patches"].reshape(b.tensors["patches"].shape[0], -1)[:, :64].tolist()
    ]
    assert len(set(ids[:n0])) == n0


def test_worker_split_is_disjoint_and_complete(pack):
    shards = open_shard_set(str(pack))
    stream = ShardStream(shards, 2, seed=0, shuffle_buffer=4)
    plan = stream.batch_plan()
    planned = [next(plan)[0] for _ in range(10)]

    class _Info:
        def __init__(self, i):
            self.id, self.num_workers = i, 3

    got = {}
    for w in range(3):
        import trainer.shards as td

        orig = td.torch.utils.data.get_worker_info
        td.torch.utils.data.get_worker_info = lambda w=w: _Info(w)
        try:
            s = ShardStream(shards, 2, seed=0, shuffle_buffer=4, max_batches=10)
            got[w] = [b.position for b in s]
        finally:
            td.torch.utils.data.get_worker_info = orig
    # Worker w built exactly batches w, w+3, ...: together all 10, none twice.
    assert [len(got[w]) for w in range(3)] == [4, 3, 3]
    assert len(planned) == 10


def test_resume_position_continues_exactly(pack):
    shards = open_shard_set(str(pack))
    src = ShardSource(shards, 4, seed=2, shuffle_buffer=8)
    full = _collect(src.batches(), 20)  # crosses into epoch 1 and 2
    assert full[-1].position.epoch >= 1
    tail = _collect(src.batches(full[6].position), 13)
    assert all(_same(a, b) for a, b in zip(full[7:], tail, strict=True))


def test_epochs_consume_pack_epochs_in_turn(pack):
    shards = open_shard_set(str(pack))
    e0 = set(map(tuple, rank_epoch_rows(shards, 0, 0, 0, 1, 8).tolist()))
    e1 = set(map(tuple, rank_epoch_rows(shards, 1, 0, 0, 1, 8).tolist()))
    assert {s for s, _ in e0} == set(np.flatnonzero(shards.shard_epoch == 0).tolist())
    assert {s for s, _ in e1} == set(np.flatnonzero(shards.shard_epoch == 1).tolist())


def test_batch_format_matches_images(tmp_path):
    images, labels = make_images(10, seed=3)
    d = write_pack(tmp_path / "p", images, labels, seq_len=64, shard_rows=100)
    shards = open_shard_set(str(d))
    n_rows = shards.shard_rows(0)
    # shuffle_buffer=1 keeps the packed order; one batch = the whole epoch.
    batch = next(iter(ShardSource(shards, n_rows, seed=0, shuffle_buffer=1).batches())).tensors
    seg, grid, pos = batch["segment_ids"], batch["grid_hw"], batch["pos_hw"]
    assert batch["patches"].dtype == torch.uint8 and seg.dtype == torch.int32
    assert batch["labels"].tolist() == [labels[i] for i in np.random.default_rng([7, 0]).permutation(10)]
    # Per token: grid of its image; padding 0; positions inside the grid.
    assert (grid[seg == 0] == 0).all()
    assert ((pos[..., 0] < grid[..., 0]) | (seg == 0)).all()
    # The first image of row 0, rebuilt from its patches, equals the source image.
    first = np.random.default_rng([7, 0]).permutation(10)[0]
    h, w = images[first].shape[:2]
    n = (h // 8) * (w // 8)
    toks = batch["patches"][0, :n].numpy().reshape(h // 8, w // 8, 8, 8, 3)
    assert np.array_equal(toks.transpose(0, 2, 1, 3, 4).reshape(h, w, 3), images[first])
    assert grid[0, 0].tolist() == [h // 8, w // 8]


def test_iter_batches_client_api(pack):
    it = iter_batches(str(pack), 3, seed=1)
    first = [next(it) for _ in range(4)]
    again = iter_batches(str(pack), 3, seed=1, start=first[1][1])
    assert torch.equal(next(again)[0]["patches"], first[2][0]["patches"])


def test_record_batch_source_resumes(pack):
    # Live mode / Flight go through RecordBatchSource: same position semantics.
    shards = open_shard_set(str(pack))

    def epoch_batches(epoch, start_row):
        rows = 0
        for s in np.flatnonzero(shards.shard_epoch == epoch % 2):
            for t in schema.iter_row_groups(str(pack), shards.files[s]):
                for rb in t.to_batches():
                    if rows + rb.num_rows <= start_row:
                        rows += rb.num_rows
                        continue
                    yield rb.slice(max(0, start_row - rows))
                    rows += rb.num_rows

    src = RecordBatchSource(epoch_batches, 4, shards.seq_len, shards.patch_size)
    full = _collect(src.batches(), 15)
    tail = _collect(src.batches(full[4].position), 10)
    assert all(_same(a, b) for a, b in zip(full[5:], tail, strict=True))


# ---- bad pack directories: one-line DataError before training --------------------------------------


def _copy_pack(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_index", "no index.json"),
        ("bad_json", "not valid JSON"),
        ("version", "format version 99 is not supported"),
        ("checksum", "checksum mismatch"),
        ("missing_shard", "missing"),
        ("empty", "shard list is empty"),
    ],
)
def test_bad_pack_dirs_fail_with_one_line(pack, tmp_path, breakage, message):
    d = _copy_pack(pack, tmp_path / "p")
    idx_path = d / "index.json"
    idx = json.loads(idx_path.read_text())
    if breakage == "no_index":
        idx_path.unlink()
    elif breakage == "bad_json":
        idx_path.write_text("{not json")
    elif breakage == "version":
        idx["version"] = 99
        idx_path.write_text(json.dumps(idx))
    elif breakage == "checksum":
        f = d / idx["shards"][1]["file"]
        data = bytearray(f.read_bytes())
        data[100] ^= 0xFF
        f.write_bytes(bytes(data))
    elif breakage == "missing_shard":
        (d / idx["shards"][0]["file"]).unlink()
    elif breakage == "empty":
        idx["shards"] = []
        idx_path.write_text(json.dumps(idx))
    with pytest.raises(DataError) as e:
        open_shard_set(str(d))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_data_scheme(pack):
    from trainer.data import open_source

    with pytest.raises(NavitError, match="unknown scheme"):
        open_source("ftp://x/y", batch_size=2, seed=0)


def test_position_roundtrip():
    p = DataPosition(3, 17)
    assert DataPosition.from_dict(json.loads(json.dumps(p.to_dict()))) == p
