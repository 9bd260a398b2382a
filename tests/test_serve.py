"""`navit serve` over loopback: partitions, exact resume after a killed client, auth, TLS, errors,
status, bounded server memory with a slow client, and live mode against `navit pack`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from packer import schema
from packer.errors import ConfigError, DataError, NavitError
from packer.serve.epochs import ShardSetSource, rank_range
from packer.serve.flight import make_server
from trainer.flight_client import FlightDataClient, flight_batches

ROOT = Path(__file__).resolve().parents[1]
NAVIT = [sys.executable, "-m", "cli.main"]


# ----------------------------------------------------------------------------------------------------
# Fixtures: a pack directory written with packer.schema, and servers over it
# ----------------------------------------------------------------------------------------------------


def make_pack(
    out: Path,
    shard_rows: list[int],
    epochs: int = 1,
    seq_len: int = 16,
    patch_size: int = 2,
    row_group_rows: int = 4,
    seed: int = 0,
) -> Path:
    """A valid pack: ``shard_rows`` shards per epoch of random rows with unique image ids."""
    rng = np.random.default_rng(seed)
    tb = schema.token_bytes(patch_size)
    entries, k, img = [], 0, 0
    half = seq_len // 2
    for epoch in range(epochs):
        for n in shard_rows:
            seg = np.zeros((n, seq_len), np.int16)
            seg[:, :half], seg[:, half : seq_len - 1] = 1, 2  # two images, one padding token
            rows = schema.PackedRows(
                patches=rng.integers(0, 256, (n, seq_len, tb), dtype=np.uint8),
                segment_ids=seg,
                pos_h=np.zeros((n, seq_len), np.int16),
                # Each image's tokens at columns 0.. of its one-row grid; padding at 0.
                pos_w=np.tile(np.r_[np.arange(half), np.arange(seq_len - 1 - half), 0], (n, 1)).astype(
                    np.int16
                ),
                image_ids=[np.array([img + 2 * r, img + 2 * r + 1]) for r in range(n)],
                labels=[np.array([r % 3, -1]) for r in range(n)],
                grid_h=[np.array([1, 1])] * n,
                grid_w=[np.array([half, seq_len - 1 - half])] * n,
                tokens_full=[np.array([half, seq_len - 1 - half])] * n,
            )
            img += 2 * n
            data = schema.table_to_parquet_bytes(
                schema.rows_to_table(rows, seq_len, patch_size), row_group_rows
            )
            name = schema.shard_file_name(k)
            schema.atomic_write_bytes(*schema.resolve_fs(str(out / name)), data)
            entries.append(
                {"file": name, "rows": n, "images": 2 * n, "real_tokens": n * (seq_len - 1)}
                | {"sha256": schema.sha256_bytes(data), "epoch": epoch}
            )
            k += 1
    index = {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "seq_len": seq_len,
        "patch_size": patch_size,
        "channels": schema.CHANNELS,
        "shards": entries,
        "totals": {},
        "config": {},
    }
    (out / schema.INDEX_FILE).write_bytes(schema.dumps_index(index))
    return out


def epoch_table(pack: Path, epoch: int) -> pa.Table:
    """The epoch read straight from its shards, in pack order (the reference for every test)."""
    index = schema.read_index(str(pack))
    files = [e["file"] for e in index["shards"] if e.get("epoch", 0) == epoch]
    return pa.concat_tables([pq.read_table(pack / f) for f in files])


def row_digests(data: pa.Table | list[pa.RecordBatch]) -> list[str]:
    """One sha256 per row over every column's values (the patch bytes included)."""
    table = pa.Table.from_batches(data) if isinstance(data, list) else data
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    return [
        hashlib.sha256(json.dumps([str(cols[c][i]) for c in table.column_names]).encode()).hexdigest()
        for i in range(table.num_rows)
    ]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    # Epoch 0: 13 + 9 rows (uneven shards, partial row groups); epoch 1 the same sizes, fresh rows.
    return make_pack(tmp_path_factory.mktemp("pack"), [13, 9], epochs=2)


@pytest.fixture(scope="module")
def server(pack):
    srv = make_server(ShardSetSource(str(pack)), host="127.0.0.1", port=0)
    yield srv
    srv.shutdown()


def uri(srv) -> str:
    return f"flight://127.0.0.1:{srv.port}"


# ----------------------------------------------------------------------------------------------------
# Partitions
# ----------------------------------------------------------------------------------------------------


@given(st.integers(0, 500), st.integers(1, 17))
def test_rank_ranges_are_balanced_disjoint_and_cover_the_epoch(n, world):
    ranges = [rank_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))  # contiguous, disjoint
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_two_concurrent_ranks_partition_the_epoch_row_for_row(pack, server):
    got: dict[int, list[pa.RecordBatch]] = {}

    def read(rank: int) -> None:
        got[rank] = list(flight_batches(uri(server), epoch=1, rank=rank, world_size=2))

    threads = [threading.Thread(target=read, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = epoch_table(pack, 1)
    assert sum(b.num_rows for b in got[0]) == 11 and sum(b.num_rows for b in got[1]) == 11
    for batches in got.values():
        assert all(b.schema.equals(schema.shard_schema(16, 2), check_metadata=True) for b in batches)
    ids = [pa.Table.from_batches(got[r]).column("image_ids").to_pylist() for r in (0, 1)]
    assert not {i for row in ids[0] for i in row} & {i for row in ids[1] for i in row}  # disjoint
    # Union in rank order equals the shard set, every column, every byte.
    assert pa.Table.from_batches(got[0] + got[1]).equals(expected)
    # The server's epoch action agrees with what was streamed.
    with FlightDataClient(uri(server)) as c:
        assert c.epoch_rows(1, world_size=2) == {
            "epoch": 1,
            "rows": 22,
            "world_size": 2,
            "rank_rows": [11, 11],
        }


def test_start_row_resumes_inside_a_rank(pack, server):
    full = pa.Table.from_batches(list(flight_batches(uri(server), 0, rank=1, world_size=3)))
    assert full.equals(epoch_table(pack, 0).slice(7, 7))  # rank 1 of 22 rows over 3 ranks: rows 7..13
    for start in (0, 3, 7):
        tail = list(flight_batches(uri(server), 0, rank=1, world_size=3, start_row=start))
        assert pa.Table.from_batches(tail, schema=full.schema).equals(full.slice(start))


_KILLED_CLIENT = """
import sys, time, json
sys.path.insert(0, sys.argv[2])
from trainer.flight_client import flight_batches
for batch in flight_batches(sys.argv[1], epoch=0, rank=0, world_size=1):
    print(json.dumps(batch.column("image_ids").to_pylist()), flush=True)
    time.sleep(0.3)  # a slow consumer: the test kills it part way
"""


def test_client_killed_mid_stream_resumes_exactly(pack, server):
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, uri(server), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    seen = [json.loads(proc.stdout.readline()) for _ in range(2)]  # two batches consumed, then kill -9
    proc.kill()
    proc.wait()
    done = sum(len(b) for b in seen)
    resumed = list(flight_batches(uri(server), epoch=0, rank=0, world_size=1, start_row=done))
    ids = [i for b in seen for i in b] + pa.Table.from_batches(resumed).column("image_ids").to_pylist()
    assert ids == epoch_table(pack, 0).column("image_ids").to_pylist()
    assert row_digests(resumed) == row_digests(epoch_table(pack, 0))[done:]
    # The killed client's stream does not linger in the server's status (it either finished sending
    # into gRPC's buffers before the kill, or ended early when gRPC noticed the disconnect).
    with FlightDataClient(uri(server)) as c:
        for _ in range(100):
            status = c.status()
            if not status["streams_in_progress"]:
                break
            time.sleep(0.05)
    assert status["streams_in_progress"] == []


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_bad_tickets_and_unknown_epoch_are_one_line_errors(server):
    raw = fl.connect(f"grpc+tcp://127.0.0.1:{server.port}")
    for ticket, why in [
        (b"not json", "bad ticket: expected JSON"),
        (b'{"epoch": 0, "rank": 2, "world_size": 2}', "rank must be in"),
        (b'{"epoch": 0, "rank": 0}', "missing 'world_size'"),
        (b'{"epoch": "0", "rank": 0, "world_size": 1}', "'epoch' must be an integer"),
        (b'{"epoch": 0, "rank": 0, "world_size": 1, "shuffle": 1}', "unknown keys"),
    ]:
        with pytest.raises(fl.FlightServerError, match=why):
            raw.do_get(fl.Ticket(ticket)).read_all()
    with pytest.raises(DataError, match="unknown epoch 7: this server has epochs 0..1") as e:
        list(flight_batches(uri(server), epoch=7, wrap_epochs=False))
    assert "\n" not in str(e.value) and "Detail" not in str(e.value)
    with pytest.raises(DataError, match="start_row 12 is past the end of rank 0's 11 rows"):
        list(flight_batches(uri(server), epoch=0, rank=0, world_size=2, start_row=12))
    assert list(flight_batches(uri(server), epoch=0, rank=0, world_size=2, start_row=11)) == []


def test_training_epochs_cycle_through_the_packs_epochs(pack, server):
    # Like `navit train` on a pack directory: training epoch 3 of a 2-epoch pack reads pack epoch 1.
    got = pa.Table.from_batches(list(flight_batches(uri(server), epoch=3)))
    assert got.equals(epoch_table(pack, 1))
    with FlightDataClient(uri(server)) as c:
        info = c.info()
    assert info["epochs"] == [0, 1] and info["num_classes"] == 3 and info["seq_len"] == 16


def test_port_in_use_is_a_clear_error(pack, server):
    with pytest.raises(NavitError, match=f"port {server.port} on 127.0.0.1 is already in use"):
        make_server(ShardSetSource(str(pack)), port=server.port)


def test_shard_set_that_disagrees_with_its_index_is_refused(tmp_path):
    pack = make_pack(tmp_path, [5])
    index = json.loads((pack / "index.json").read_text())
    index["shards"][0]["rows"] = 6
    (pack / "index.json").write_bytes(schema.dumps_index(index))
    with pytest.raises(DataError, match="5 rows, index.json says 6"):
        ShardSetSource(str(pack))


# ----------------------------------------------------------------------------------------------------
# Security: tokens, binding, TLS
# ----------------------------------------------------------------------------------------------------


def test_token_is_required_when_set_and_not_on_plain_localhost(pack, server):
    assert len(list(flight_batches(uri(server), 0))) > 0  # the module server has no token
    srv = make_server(ShardSetSource(str(pack)), port=0, token="s3cret-token")
    try:
        u = uri(srv)
        with pytest.raises(NavitError, match="refused the call: no token given"):
            list(flight_batches(u, 0))
        with pytest.raises(NavitError, match="refused the call: wrong token"):
            list(flight_batches(u, 0, token="guess"))
        with pytest.raises(NavitError, match="wrong token"):
            FlightDataClient(u, token="guess").status()  # actions are guarded too
        got = pa.Table.from_batches(list(flight_batches(u, 0, token="s3cret-token")))
        assert got.equals(epoch_table(pack, 0))
    finally:
        srv.shutdown()


def test_non_loopback_bind_without_token_is_refused(pack, tmp_path):
    with pytest.raises(ConfigError, match="--host 0.0.0.0 is reachable from other machines"):
        make_server(ShardSetSource(str(pack)), host="0.0.0.0", port=0)
    # Through the CLI: exit code 2 and one line on stderr, nothing listening.
    r = subprocess.run(
        [*NAVIT, "serve", str(pack), "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --host 0.0.0.0 is reachable") and "\n" not in r.stderr.strip()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_with_a_self_signed_certificate(pack, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    srv = make_server(
        ShardSetSource(str(pack)), port=0, token="tok", tls_cert=cert.read_bytes(), tls_key=key.read_bytes()
    )
    try:
        u = f"flight+tls://127.0.0.1:{srv.port}"
        got = list(flight_batches(u, 1, token="tok", tls_root_cert=cert.read_bytes()))
        assert pa.Table.from_batches(got).equals(epoch_table(pack, 1))
        with pytest.raises(NavitError):  # plain gRPC to a TLS port fails, it is never served in clear
            list(flight_batches(f"flight://127.0.0.1:{srv.port}", 1, token="tok", retries=0))
    finally:
        srv.shutdown()


# ----------------------------------------------------------------------------------------------------
# The CLI server: status, and memory with a slow client
# ----------------------------------------------------------------------------------------------------


def _start_cli_server(args: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [*NAVIT, "serve", *args, "--port", "0", "-q"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    m = re.search(r"listening on flight://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, int(m.group(1))


@pytest.mark.slow
def test_slow_client_keeps_server_memory_bounded(tmp_path):
    psutil = pytest.importorskip("psutil")
    # 400 rows of 1024 tokens × 8×8×3 bytes = 196 KB per row; row groups of 8 rows = 1.6 MB; 79 MB epoch.
    pack = make_pack(tmp_path, [200, 200], seq_len=1024, patch_size=8, row_group_rows=8)
    row_group_bytes = 8 * 1024 * schema.token_bytes(8)
    epoch_bytes = 400 * 1024 * schema.token_bytes(8)
    proc, port = _start_cli_server([str(pack)])
    try:
        server = psutil.Process(proc.pid)

        def rss() -> int:  # the server reads shards with buffered I/O, so RSS is its own memory
            return server.memory_info().rss

        base, peak, stop = rss(), [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        rows = 0
        for batch in flight_batches(f"flight://127.0.0.1:{port}", epoch=0):
            rows += batch.num_rows
            time.sleep(0.02)  # the client drains 50 batches slowly; the server must wait, not buffer
            if rows == 200:  # half way: the status command sees the stream
                st_ = subprocess.run(
                    [*NAVIT, "serve", "--status", "--port", str(port), "--json"],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                status = json.loads(st_.stdout)
                assert status["clients_connected"] == 1
                (stream,) = status["streams_in_progress"]
                assert stream["rows_total"] == 400 and 200 <= stream["rows_sent"] < 400
        stop.set()
        sampler.join()
        assert rows == 400
        growth = peak[0] - base
        # Bound: a few row groups in flight plus gRPC's flow-control window and allocator slack —
        # independent of the epoch size (which is 3× larger than this bound).
        bound = 8 * row_group_bytes + 16 * 2**20
        print(f"server RSS growth {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
        assert growth < bound < epoch_bytes / 2, (growth / 2**20, bound / 2**20)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "stopped; 400 rows" in out


# ----------------------------------------------------------------------------------------------------
# Live mode: the served epoch equals `navit pack` of the same source and seed
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_live_epochs_equal_navit_pack_byte_for_byte(tmp_path, ray_session):
    """Serve SOURCE live (plan + Ray, nothing written) and compare with `navit pack` of the same
    source, flags and seed: every row of every column, per rank and joined."""
    from typer.testing import CliRunner

    from cli.common import pack_config_from_flags
    from cli.main import app
    from packer.serve.epochs import LiveSource
    from packer.synth import generate

    generate(tmp_path / "img", n=14, seed=3, threads=1)
    flags = dict(seq_len=64, patch_size=16, seed=5, resolution="uniform:32:96", token_drop="constant:0.25")
    out = tmp_path / "packed"
    args = ["pack", str(tmp_path / "img"), "--out", str(out), "--shard-rows", "2", "--epochs", "2"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    # Serve with a different unit of work (shard_rows 3): row contents must not depend on it.
    cfg = pack_config_from_flags(None, **flags, sets=["output.shard_rows=3"])
    srv = make_server(LiveSource(str(tmp_path / "img"), cfg), port=0)
    try:
        for epoch, world in ((0, 1), (1, 2)):
            got: dict[int, list[pa.RecordBatch]] = {}

            def read(rank: int, epoch: int = epoch, world: int = world, got: dict = got) -> None:
                got[rank] = list(flight_batches(uri(srv), epoch=epoch, rank=rank, world_size=world))

            threads = [threading.Thread(target=read, args=(r,)) for r in range(world)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            expected = epoch_table(out, epoch)
            served = pa.Table.from_batches([b for r in range(world) for b in got[r]])
            assert served.num_rows == expected.num_rows > 0
            assert row_digests(served) == row_digests(expected)
            assert served.equals(expected)
            for b in got[0]:
                assert b.schema.equals(schema.shard_schema(64, 16), check_metadata=True)
        with FlightDataClient(uri(srv)) as c:
            info = c.info()
        assert info["mode"] == "live" and info["epochs"] is None and info["num_classes"] == 6
    finally:
        srv.shutdown()


# ----------------------------------------------------------------------------------------------------
# The trainer's plug-in: `navit train --data flight://` batches and positions
# ----------------------------------------------------------------------------------------------------


def test_trainer_flight_source_batches_and_resumes_exactly(pack, server):
    data = pytest.importorskip("trainer.data")
    from trainer import batch

    if not hasattr(data, "open_source"):
        pytest.skip("trainer.data.open_source not available")
    src = data.open_source(uri(server), batch_size=4, seed=0)
    assert (src.seq_len, src.patch_size, src.num_classes) == (16, 2, 3)
    it = src.batches(batch.DataPosition())
    first = [next(it) for _ in range(8)]  # 32 rows: all 22 of epoch 0, then 10 of epoch 1
    it.close()
    expected = batch.Rows.from_arrow(pa.concat_tables([epoch_table(pack, 0), epoch_table(pack, 1)]))
    got = np.concatenate([b.tensors["patches"].numpy() for b in first])
    np.testing.assert_array_equal(got, expected.patches[:32])
    # Batch 5 straddles the epochs: rows 20-21 of epoch 0, then rows 0-1 of epoch 1.
    assert first[4].position == batch.DataPosition(0, 20) and first[5].position == batch.DataPosition(1, 2)
    # Resume from a checkpointed position: the same batches as the uninterrupted stream.
    it = src.batches(first[2].position)
    resumed = [next(it) for _ in range(5)]
    it.close()
    for a, b in zip(resumed, first[3:], strict=True):
        assert a.position == b.position
        for k in a.tensors:
            assert torch_equal(a.tensors[k], b.tensors[k]), k


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


# ----------------------------------------------------------------------------------------------------
# Damaged shards without --verify (issue 12 item 5): one line, never a traceback
# ----------------------------------------------------------------------------------------------------


def damaged_copy(pack: Path, dst: Path, how: str) -> Path:
    """A copy of ``pack`` whose shard 1 is cut in half ('truncated') or has the page header of its
    second row group's segment_ids overwritten ('corrupt page'; the footer stays intact)."""
    shutil.copytree(pack, dst)
    f = dst / schema.shard_file_name(1)
    data = bytearray(f.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    else:
        names = [c.path for c in pq.ParquetFile(f).metadata.schema]
        col = pq.ParquetFile(f).metadata.row_group(1).column(names.index("segment_ids.list.element"))
        data[col.data_page_offset : col.data_page_offset + 8] = b"\xff" * 8
    f.write_bytes(bytes(data))
    return dst


def test_truncated_shard_without_verify_is_a_one_line_error(pack, tmp_path):
    bad = damaged_copy(pack, tmp_path / "bad", "truncated")
    with pytest.raises(DataError, match=r"shard-000001.parquet: cannot open shard") as e:
        ShardSetSource(str(bad))
    assert "\n" not in str(e.value)
    proc = subprocess.run(
        [*NAVIT, "serve", str(bad), "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "shard-000001.parquet: cannot open shard" in proc.stderr


def test_corrupt_page_reaches_the_client_as_one_line(pack, tmp_path):
    bad = damaged_copy(pack, tmp_path / "bad", "corrupt page")
    srv = make_server(ShardSetSource(str(bad)), host="127.0.0.1", port=0)
    try:
        with pytest.raises(DataError, match=r"shard-000001.parquet: cannot read row group 1") as e:
            list(flight_batches(uri(srv), epoch=0))
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value) and ".py" not in str(e.value)
        # Rank 0 of 2 reads rows 0..10 (shard 0 only): still served.
        assert sum(b.num_rows for b in flight_batches(uri(srv), epoch=0, rank=0, world_size=2)) == 11
    finally:
        srv.shutdown()


# ----------------------------------------------------------------------------------------------------
# Hostile requests (issue 12 items 6 and 9): validated, capped, one line, no server internals
# ----------------------------------------------------------------------------------------------------


def _epoch_action(srv, body: bytes) -> dict:
    raw = fl.connect(f"grpc+tcp://127.0.0.1:{srv.port}")
    return json.loads(list(raw.do_action(fl.Action("epoch", body)))[0].body.to_pybytes())


def test_epoch_action_takes_integers_only_and_caps_world_size(server):
    from packer.serve.flight import MAX_WORLD_SIZE

    got = _epoch_action(server, b'{"epoch": 1, "world_size": 3}')
    assert got["rows"] == 22 and got["rank_rows"] == [7, 7, 8]
    assert len(_epoch_action(server, json.dumps({"world_size": MAX_WORLD_SIZE}).encode())["rank_rows"]) == (
        MAX_WORLD_SIZE
    )
    assert _epoch_action(server, b"")["rank_rows"] == [22]  # defaults: epoch 0, world_size 1
    for body, why in [
        (b'{"epoch": 0, "world_size": 10000000}', rf"world_size must be in \[1, {MAX_WORLD_SIZE}\]"),
        (b'{"epoch": 0, "world_size": 2.7}', "'world_size' must be an integer, got 2.7"),
        (b'{"epoch": 0, "world_size": "3"}', "'world_size' must be an integer, got '3'"),
        (b'{"epoch": 0, "world_size": true}', "'world_size' must be an integer, got True"),
        (b'{"epoch": 1.0}', "'epoch' must be an integer"),
        (b'{"epoch": 0, "ranks": 2}', "unknown keys"),
        (b"[0, 1]", "expected a JSON object"),
        (b'{"epoch": -1}', "unknown epoch -1"),
    ]:
        with pytest.raises(fl.FlightServerError, match=why):
            _epoch_action(server, body)
    # Tickets have the same cap.
    raw = fl.connect(f"grpc+tcp://127.0.0.1:{server.port}")
    ticket = json.dumps({"epoch": 0, "rank": 0, "world_size": MAX_WORLD_SIZE + 1}).encode()
    with pytest.raises(fl.FlightServerError, match="world_size must be in"):
        raw.do_get(fl.Ticket(ticket)).read_all()


HOSTILE = {  # the probes of issue 12: refused by size before parsing
    "nested": b"[" * 100_000 + b"]" * 100_000,  # json.loads: RecursionError
    "nested object": b'{"epoch": ' * 50_000 + b"0" + b"}" * 50_000,
    "4301-digit integer": b'{"epoch": 1' + b"0" * 4300 + b', "rank": 0, "world_size": 1}',  # ValueError
    "huge ticket": json.dumps({"epoch": 0, "rank": 0, "world_size": 1, "x": "a" * 100_000}).encode(),
    # within the size limit: parsed, then refused
    "nested within the size limit": b"[" * 2000 + b"]" * 2000,  # deeper than the recursion limit
    "int64 overflow": b'{"epoch": 1' + b"0" * 30 + b', "rank": 0, "world_size": 1}',
}


def test_parse_errors_are_bad_tickets_whatever_the_size_limit(monkeypatch):
    """Deep nesting and over-long integers fail inside json.loads (RecursionError, ValueError): bad
    tickets too, should the size limit ever be raised."""
    from packer.serve import flight as flight_server
    from packer.serve.flight import BadTicket, parse_ticket

    monkeypatch.setattr(flight_server, "MAX_REQUEST_BYTES", 10**7)
    for name in ("nested", "nested object", "4301-digit integer"):
        with pytest.raises(BadTicket, match="bad ticket: expected JSON like"):
            parse_ticket(HOSTILE[name])


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_requests_get_one_line_errors_without_tracebacks(server, name):
    raw = fl.connect(f"grpc+tcp://127.0.0.1:{server.port}")
    body = HOSTILE[name]
    for call in (
        lambda: raw.do_get(fl.Ticket(body)).read_all(),
        lambda: list(raw.do_action(fl.Action("epoch", body))),
    ):
        with pytest.raises(fl.FlightServerError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(("bad ticket:", "bad request:")), msg[:300]
        assert "Traceback" not in msg and ".py" not in msg and "\n" not in msg, msg[:300]
    assert list(flight_batches(uri(server), epoch=0, rank=0, world_size=2))  # the server still serves


class _BrokenSource:
    """A source whose reads fail with an unexpected (non-navit) error naming a server path."""

    mode = "shards"

    def __init__(self, pack: Path) -> None:
        self._real = ShardSetSource(str(pack))
        self.schema = self._real.schema

    def epochs(self):
        return self._real.epochs()

    def epoch_rows(self, epoch: int) -> int:
        if epoch == 1:
            raise KeyError("/srv/secret/path/index.py")
        return self._real.epoch_rows(epoch)

    def stream(self, epoch: int, lo: int, hi: int):
        yield from self._real.stream(epoch, lo, min(hi, lo + 4))
        raise RuntimeError("disk gone at /srv/secret/path/shard.parquet")

    def describe(self):
        return self._real.describe()


def test_unexpected_server_errors_are_logged_not_sent(pack, caplog):
    srv = make_server(_BrokenSource(pack), host="127.0.0.1", port=0)
    try:
        with caplog.at_level("ERROR", logger="navit.serve"):
            with pytest.raises(DataError) as e1:
                list(flight_batches(uri(srv), epoch=1, wrap_epochs=False))
            with pytest.raises(DataError) as e2:
                list(flight_batches(uri(srv), epoch=0))
            raw = fl.connect(f"grpc+tcp://127.0.0.1:{srv.port}")
            with pytest.raises(fl.FlightServerError) as e3:
                list(raw.do_action(fl.Action("epoch", b'{"epoch": 1}')))
        for e in (e1, e2, e3):
            msg = str(e.value)
            assert "internal error" in msg and "secret" not in msg and "Traceback" not in msg, msg[:300]
        logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
        assert "/srv/secret/path/index.py" in logged and "disk gone" in logged
        assert all(r.exc_info for r in caplog.records)  # the traceback goes to the server log
    finally:
        srv.shutdown()
