"""The bookkeeping behind `navit serve --status`: streams, their state, clients, counters.

Flight serves each call on its own thread, so :class:`ServeState` is a lock-guarded registry. A
stream is in one of three states, known from where its generator is (packer/serve/flight.py):

- ``producing``: the server is reading or building the next batch (the client is not the holdup);
- ``streaming``: the batch was handed to gRPC and the client accepted the previous one less than
  ``stall_after_s`` ago;
- ``stalled``: gRPC has not taken a batch for ``stall_after_s`` or more — the client is not reading
  (flow control holds the server). After ``idle_timeout_s`` such a stream is cancelled
  (packer/serve/streams.py).

A stream counts as complete once every row was handed to gRPC; the last few MB may still sit in
the transport's buffers (the server cannot see a client's reads beyond flow control). A *client* is
one connection (``ip:port`` as gRPC reports it): eight trainers on one machine are eight clients on
one host.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote


class Refused(Exception):
    """A stream the server will not open now (stream cap reached, shutting down): one line."""


@dataclass
class StreamRecord:
    peer: str
    ticket: dict[str, int]
    rows_total: int  # rows this stream will send if drained
    started: float = field(default_factory=time.monotonic)
    rows_sent: int = 0
    bytes_sent: int = 0
    producing: bool = True  # False while a batch waits for the client (gRPC flow control)
    waiting_since: float = field(default_factory=time.monotonic)
    timed_out: bool = False


class ServeState:
    """Thread-safe counters and the registry of open streams."""

    def __init__(self, max_streams: int = 0, idle_timeout_s: float = 0, stall_after_s: float = 5.0) -> None:
        self.max_streams = max_streams  # 0 = no cap
        self.idle_timeout_s = idle_timeout_s  # 0 = never
        self.stall_after_s = stall_after_s
        self._lock = threading.Lock()
        self._next_id = 0
        self.active: dict[int, StreamRecord] = {}
        self.rows_served = 0
        self.bytes_served = 0
        self.streams_completed = 0
        self.streams_aborted = 0
        self.streams_refused = 0
        self.streams_timed_out = 0
        self.peers_seen: set[str] = set()
        self.stopping = False
        self.started = time.time()

    def open(self, peer: str, ticket: dict[str, int], rows_total: int) -> int:
        """Register a stream, or :class:`Refused` when the cap is reached or the server stops."""
        with self._lock:
            if self.stopping:
                self.streams_refused += 1
                raise Refused("navit serve is shutting down; no new streams")
            if self.max_streams and len(self.active) >= self.max_streams:
                self.streams_refused += 1
                raise Refused(
                    f"navit serve is busy: {len(self.active)} streams in progress, the most it "
                    f"allows (--max-streams {self.max_streams}); try again later"
                )
            sid = self._next_id
            self._next_id += 1
            self.active[sid] = StreamRecord(peer, ticket, rows_total)
            self.peers_seen.add(peer)
            return sid

    def handed_over(self, sid: int) -> None:
        """A batch was given to gRPC; until gRPC takes it the stream waits for the client."""
        with self._lock:
            s = self.active[sid]
            s.producing = False
            s.waiting_since = time.monotonic()

    def accepted(self, sid: int, rows: int, nbytes: int) -> None:
        """gRPC took the batch (Flight asks for the next one): the rows count as sent."""
        with self._lock:
            s = self.active[sid]
            s.rows_sent += rows
            s.bytes_sent += nbytes
            s.producing = True
            s.waiting_since = time.monotonic()
            self.rows_served += rows
            self.bytes_served += nbytes

    def close(self, sid: int) -> StreamRecord | None:
        with self._lock:
            s = self.active.pop(sid, None)
            if s is None:  # already dropped by discard()
                return None
            if s.rows_sent == s.rows_total:
                self.streams_completed += 1
            else:
                self.streams_aborted += 1
                self.streams_timed_out += s.timed_out
            return s

    def discard(self, sid: int) -> None:
        """The call is over: a stream still registered (its generator never ran) is dropped."""
        with self._lock:
            if self.active.pop(sid, None) is not None:
                self.streams_aborted += 1

    def idle_streams(self) -> list[tuple[int, str]]:
        """(id, peer) of streams the client has not read from for ``idle_timeout_s``; marks them."""
        if not self.idle_timeout_s:
            return []
        now = time.monotonic()
        with self._lock:
            out = []
            for sid, s in self.active.items():
                if not s.producing and now - s.waiting_since >= self.idle_timeout_s:
                    s.timed_out = True
                    out.append((sid, s.peer))
            return out

    def state_of(self, s: StreamRecord, now: float) -> str:
        if s.producing:
            return "producing"
        return "stalled" if now - s.waiting_since >= self.stall_after_s else "streaming"

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            streams = [
                {
                    "id": sid,
                    "peer": s.peer,
                    **s.ticket,
                    "state": self.state_of(s, now),
                    "rows_total": s.rows_total,
                    "rows_sent": s.rows_sent,
                    "bytes_sent": s.bytes_sent,
                    "seconds": round(now - s.started, 3),
                    "idle_s": round(now - s.waiting_since, 3) if not s.producing else 0.0,
                }
                for sid, s in sorted(self.active.items())
            ]
            counts = {k: sum(s["state"] == k for s in streams) for k in ("streaming", "stalled", "producing")}
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "streams_in_progress": streams,
                "streams_streaming": counts["streaming"],
                "streams_stalled": counts["stalled"],
                "streams_producing": counts["producing"],
                "clients_connected": len({s["peer"] for s in streams}),
                "hosts_connected": len({host_of(s["peer"]) for s in streams}),
                "clients_seen": len(self.peers_seen),
                "rows_served": self.rows_served,
                "bytes_served": self.bytes_served,
                "streams_completed": self.streams_completed,
                "streams_aborted": self.streams_aborted,
                "streams_refused": self.streams_refused,
                "streams_timed_out": self.streams_timed_out,
                "max_streams": self.max_streams,
                "idle_timeout_s": self.idle_timeout_s,
                "stall_after_s": self.stall_after_s,
            }


def host_of(peer: str) -> str:
    """'ipv4:127.0.0.1:5312' → 'ipv4:127.0.0.1' (the connections of one machine share it)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


def peer_address(peer: str) -> tuple[str, int] | None:
    """gRPC's peer string → (ip, port): 'ipv4:127.0.0.1:5312', 'ipv6:[::1]:5312'; None otherwise."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None
