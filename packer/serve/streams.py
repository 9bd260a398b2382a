"""Ending streams the server cannot otherwise end: idle clients, and stopping the server.

A stream whose client stopped reading sits inside gRPC's write, which returns only when the client
reads or the connection ends; pyarrow offers neither a per-call cancel nor a shutdown deadline
(``FlightServerBase.shutdown`` waits for every call, so before this module one stalled client kept
`navit serve` from stopping on Ctrl-C or SIGTERM). The server therefore ends such a stream by
shutting down its TCP connection: ``shutdown(2)`` on the accepted socket, found by the peer address
gRPC reports (gRPC still owns and closes the descriptor). The write fails, the call ends, the
stream's generator is closed and its buffers freed. The client sees its connection drop; navit's
client (trainer/flight_client.py) reconnects at the row it had reached.

Sockets are found by listing this process's descriptors (``/proc/self/fd``, or ``/dev/fd``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from packer.serve.status import ServeState, peer_address

log = logging.getLogger("navit.serve")

DEFAULT_MAX_STREAMS = 64
DEFAULT_IDLE_TIMEOUT_S = 300.0
STOP_GRACE_S = 5.0  # how long a stop waits for cancelled streams to end before exiting anyway


def _descriptors() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return [int(name) for name in os.listdir(folder)]
        except (OSError, ValueError):
            continue
    return []


def _plain_ip(ip: str) -> str:
    # A dual-stack listener reports IPv4 peers as '::ffff:127.0.0.1'; gRPC says 'ipv4:127.0.0.1'.
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def close_connections(port: int, peers: set[tuple[str, int]] | None = None) -> int:
    """Shut down the accepted TCP connections on ``port`` (only those from ``peers`` when given).
    Returns how many were shut down."""
    wanted = None if peers is None else {(_plain_ip(h), p) for h, p in peers}
    closed = 0
    for fd in _descriptors():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # not a socket, or already closed
        with sock:
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                if sock.getsockname()[1] != port:
                    continue
                peer = sock.getpeername()  # the listening socket has none: OSError
            except OSError:
                continue
            if wanted is not None and (_plain_ip(peer[0]), peer[1]) not in wanted:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
                closed += 1
            except OSError:
                pass
    return closed


class IdleWatchdog:
    """Cancels streams whose client has not read for ``state.idle_timeout_s`` (checked every second
    or so, in a daemon thread)."""

    def __init__(self, state: ServeState, port: int) -> None:
        self.state, self.port = state, port
        self._stop = threading.Event()
        interval = min(1.0, max(0.05, state.idle_timeout_s / 4))
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="navit-serve-idle", daemon=True
        )

    def start(self) -> IdleWatchdog:
        if self.state.idle_timeout_s:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            idle = self.state.idle_streams()
            if not idle:
                continue
            peers = {a for a in (peer_address(p) for _, p in idle) if a is not None}
            n = close_connections(self.port, peers)
            log.info(
                "streams %s: no read for %.0f s (--idle-timeout); closed %d connection(s)",
                ",".join(str(sid) for sid, _ in idle), self.state.idle_timeout_s, n,
            )  # fmt: skip


def stop_server(server: Any, grace_s: float = STOP_GRACE_S) -> tuple[int, bool]:
    """Refuse new streams, cancel the open ones and shut ``server`` down.

    Returns (streams cancelled, whether the shutdown finished within ``grace_s``). A stream still
    producing its next batch (e.g. a live-mode shard being built on Ray) notices at its next batch;
    if that takes longer than the grace period the caller exits anyway (the connection goes with it)."""
    state: ServeState = server.state
    state.stopping = True
    cancelled = len(state.active)
    done = threading.Event()

    def shut() -> None:
        server.shutdown()  # stops accepting, then waits for every call to end
        done.set()

    threading.Thread(target=shut, name="navit-serve-shutdown", daemon=True).start()
    deadline = time.monotonic() + grace_s
    while not done.is_set() and time.monotonic() < deadline:
        # Repeated: a connection accepted just before the shutdown took effect is closed too.
        close_connections(server.port)
        done.wait(0.1)
    return cancelled, done.is_set()
