"""`navit serve` against failing and hostile clients (issues 20-22), loopback only: resume checks the
served data, stalled clients (status, stream cap, idle timeout, bounded memory), a clean stop with a
stalled client, one-line answers to RPCs navit does not offer, restart on a port left in TIME_WAIT."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from pathlib import Path

import pyarrow.flight as fl
import pytest
from test_serve import _start_cli_server, make_pack

from packer.errors import NavitError
from packer.serve.epochs import ShardSetSource
from packer.serve.flight import make_server
from trainer.flight_client import FlightDataClient

TICKET = fl.Ticket(json.dumps({"epoch": 0, "rank": 0, "world_size": 1}).encode())


def wait_for(predicate, what: str, timeout_s: float = 30.0):
    """Poll ``predicate`` until it returns something truthy (a generous deadline, not a threshold)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def big_pack(tmp_path_factory) -> Path:
    # 240 rows of 1024 tokens × 8·8·3 bytes = 196 KB a row, row groups of 8 rows (1.6 MB): an epoch
    # (47 MB) far larger than what gRPC's flow control lets a stalled stream hold.
    return make_pack(tmp_path_factory.mktemp("big"), [120, 120], seq_len=1024, patch_size=8, row_group_rows=8)


def stalled_streams(port: int, n: int) -> list:
    """``n`` clients that open a stream and never read it (kept alive by the returned list)."""
    held = []
    for _ in range(n):
        client = fl.FlightClient(f"grpc+tcp://127.0.0.1:{port}")
        try:
            held.append((client, client.do_get(TICKET)))  # reads the schema only
        except fl.FlightServerError as e:  # over the server's stream cap
            assert "busy" in str(e)
            client.close()
    return held


# ----------------------------------------------------------------------------------------------------
# Resume compares the served data, not the address (issue 22)
# ----------------------------------------------------------------------------------------------------


def test_resume_over_flight_checks_the_data_not_the_address(tmp_path):
    from train_fixtures import tiny_train_config

    from trainer.data import open_source
    from trainer.loop import train

    pack_a = make_pack(tmp_path / "a", [13, 9], seed=0)
    pack_b = make_pack(tmp_path / "b", [13, 9], seed=1)  # same geometry, other rows
    cfg = tiny_train_config(**{"schedule.steps": 4, "checkpoint.every": 2})
    run = tmp_path / "run"

    def src(port: int):
        return lambda info: open_source(f"flight://127.0.0.1:{port}", batch_size=4, seed=0)

    first = make_server(ShardSetSource(str(pack_a)), port=0)
    port = first.port
    try:
        train(cfg, src(port), run, stop_after=2, verbose=False)
    finally:
        first.shutdown()
    # Other data on the same port: refused, in one line.
    other = make_server(ShardSetSource(str(pack_b)), port=port)
    try:
        with pytest.raises(NavitError, match="not on this data") as e:
            train(cfg, src(port), run, resume=True, verbose=False)
        assert "\n" not in str(e.value)
    finally:
        other.shutdown()
    # The same data from another server on another port: accepted, and the run goes on.
    same = make_server(ShardSetSource(str(pack_a)), port=0)
    try:
        assert same.port != port
        rest = train(cfg, src(same.port), run, resume=True, verbose=False)
        assert rest.start_step == 2 and len(rest.losses) == 2
    finally:
        same.shutdown()
    # A local read of the pack is the same data too (one identity, however the pack is reached).
    assert (
        open_source(str(pack_a), batch_size=4, seed=0).fingerprint
        == ShardSetSource(str(pack_a)).describe()["data_id"]
    )


# ----------------------------------------------------------------------------------------------------
# Stalled clients: status, stream cap, idle timeout (issues 21, 22)
# ----------------------------------------------------------------------------------------------------


def test_stalled_clients_are_counted_as_such_and_the_stream_cap_refuses_in_one_line(big_pack):
    srv = make_server(ShardSetSource(str(big_pack)), port=0, max_streams=3, idle_timeout_s=0)
    srv.state.stall_after_s = 0.3  # the CLI's 5 s, shortened: a stream that waits this long is stalled
    try:
        held = stalled_streams(srv.port, 3)
        with FlightDataClient(f"flight://127.0.0.1:{srv.port}") as c:
            st = wait_for(lambda: (s := c.status())["streams_stalled"] == 3 and s, "3 stalled streams")
            assert st["clients_connected"] == 3 and st["hosts_connected"] == 1
            assert st["streams_completed"] == 0 and st["streams_streaming"] == 0
            assert all(s["state"] == "stalled" and s["rows_sent"] < 240 for s in st["streams_in_progress"])
            # A fourth stream is over the cap: one line, naming the flag.
            with pytest.raises(NavitError, match=r"busy: 3 streams in progress.*--max-streams 3") as e:
                next(iter(c.batches(0)))
            assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
            assert c.status()["streams_refused"] == 1
        del held
    finally:
        srv.stop(grace_s=10)


def test_idle_timeout_cancels_a_stream_whose_client_stopped_reading(big_pack):
    srv = make_server(ShardSetSource(str(big_pack)), port=0, max_streams=0, idle_timeout_s=0.5)
    try:
        with FlightDataClient(f"flight://127.0.0.1:{srv.port}") as c:
            stream = c.batches(0)
            rows = next(stream).num_rows  # then the client stops reading
            st = wait_for(lambda: (s := c.status())["streams_timed_out"] == 1 and s, "the idle timeout")
            assert st["streams_in_progress"] == [] and st["streams_aborted"] == 1
            # When the client comes back, navit's client reconnects at the row it had reached.
            rows += sum(b.num_rows for b in stream)
            assert rows == 240
            assert c.status()["streams_completed"] == 1
    finally:
        srv.stop(grace_s=10)


# ----------------------------------------------------------------------------------------------------
# The CLI server: memory with many stalled clients, and a clean stop while they hold streams
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_many_stalled_clients_keep_server_memory_bounded_and_sigterm_stops_it(big_pack):
    psutil = pytest.importorskip("psutil")
    proc, port = _start_cli_server([str(big_pack), "--max-streams", "4"])
    try:
        server = psutil.Process(proc.pid)
        base = server.memory_info().rss
        held = stalled_streams(port, 16)
        status = wait_for(lambda: _cli_status(port)["streams_in_progress"], "streams")
        assert len(status) == 4  # the other 12 were refused
        time.sleep(0.5)  # let the accepted streams fill what flow control allows
        growth = server.memory_info().rss - base
        # Per stream: a few row groups plus the transport's buffers; 4 streams under 64 MiB. Without
        # the cap 16 stalled streams took ~125 MB here (the epoch is 47 MB: each holds ~8 MB).
        print(f"server RSS growth with 16 stalled clients, cap 4: {growth / 2**20:.1f} MiB")
        assert growth < 64 * 2**20, growth / 2**20
        st = _cli_status(port)
        assert st["streams_refused"] == 12 and st["clients_connected"] == 4
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        print(f"stopped in {time.monotonic() - t0:.2f} s")
        del held
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, (proc.returncode, err)
    lines = out.strip().splitlines()
    assert (
        lines[-1].startswith("navit serve: stopped;") and "SIGTERM: 4 open stream(s) cancelled" in lines[-1]
    )
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_stops_a_server_that_a_stalled_client_holds(big_pack):
    proc, port = _start_cli_server([str(big_pack)])
    try:
        held = stalled_streams(port, 1)
        wait_for(lambda: _cli_status(port)["streams_in_progress"], "the stream")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)  # before: waited for the client for ever
        del held
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "SIGINT: 1 open stream(s) cancelled" in out and "Traceback" not in err


def _cli_status(port: int) -> dict:
    with FlightDataClient(f"flight://127.0.0.1:{port}", action_timeout_s=30) as c:
        return c.status()


# ----------------------------------------------------------------------------------------------------
# RPCs navit does not offer; restart on a port a crashed server left behind (issues 20, 21)
# ----------------------------------------------------------------------------------------------------


def test_rpcs_navit_does_not_offer_answer_one_line(big_pack):
    srv = make_server(ShardSetSource(str(big_pack)), port=0)
    client = fl.FlightClient(f"grpc+tcp://127.0.0.1:{srv.port}")
    descriptor = fl.FlightDescriptor.for_path("x")
    calls = {
        "list_flights": lambda: list(client.list_flights()),
        "get_flight_info": lambda: client.get_flight_info(descriptor),
        "get_schema": lambda: client.get_schema(descriptor),
        "do_put": lambda: _put(client, descriptor),
        "do_exchange": lambda: _exchange(client, descriptor),
    }
    try:
        for name, call in calls.items():
            with pytest.raises((fl.FlightError, OSError)) as e:  # pyarrow's get_schema: OSError
                call()
            text = str(e.value).split(". Detail:")[0].split(". gRPC client debug context")[0]
            assert f"navit serve: {name} is not supported" in text, (name, text)
            assert "Traceback" not in str(e.value) and "\n" not in text, (name, str(e.value))
    finally:
        client.close()
        srv.shutdown()


def _put(client, descriptor) -> None:
    import pyarrow as pa

    table = pa.table({"x": [1]})
    writer, _ = client.do_put(descriptor, table.schema)
    writer.write_table(table)
    writer.close()


def _exchange(client, descriptor) -> None:
    writer, reader = client.do_exchange(descriptor)
    try:
        writer.done_writing()
        reader.read_all()
    finally:
        with contextlib.suppress(fl.FlightError, OSError):  # already refused: keep its log quiet
            writer.close()


def test_restart_on_a_port_whose_old_connections_linger_in_time_wait(big_pack):
    # What `kill -9` of a server with clients leaves: its side of each connection closed first, so
    # the kernel keeps them in TIME_WAIT on the server's port for up to a minute.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listener has
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first → TIME_WAIT on the server's port
    client.recv(1)  # the FIN arrived
    client.close()
    listener.close()
    srv = make_server(ShardSetSource(str(big_pack)), port=port)  # before: "already in use"
    try:
        with FlightDataClient(f"flight://127.0.0.1:{port}") as c:
            assert c.info()["mode"] == "shards"
        with pytest.raises(NavitError, match=f"port {port} on 127.0.0.1 is already in use"):
            make_server(ShardSetSource(str(big_pack)), port=port)  # one really listening: refused
    finally:
        srv.shutdown()


# ----------------------------------------------------------------------------------------------------
# Live mode: SIGTERM is one line, not Ray's C-level stack dump (issues 21, 22)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_live_server_stops_on_sigterm_without_a_ray_stack_dump(tmp_path, ray_session):
    from packer.synth import generate

    generate(tmp_path / "img", n=8, seed=3, threads=1)
    # The server joins the test session's Ray (as a driver, like a server on a cluster would) rather
    # than starting its own, to keep the test short; the signal handling is the same.
    address = ray_session.get_runtime_context().gcs_address
    proc, port = _start_cli_server([str(tmp_path / "img"), "--seq-len", "64", "--ray-address", address])
    try:
        with FlightDataClient(f"flight://127.0.0.1:{port}", action_timeout_s=120) as c:
            assert c.info()["mode"] == "live"  # Ray is up in the server by now, whenever it started
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert "SIGTERM received" not in err and "PC: @" not in err, err[-2000:]
    assert out.strip().splitlines()[-1].startswith("navit serve: stopped;")
