"""The Arrow Flight transport of `navit serve`: tickets, auth, TLS, backpressure and status.

- ``do_get(ticket)`` streams one rank's partition of one epoch (see packer/serve/epochs.py for the
  partition). The ticket is UTF-8 JSON ``{"epoch": E, "rank": R, "world_size": W, "start_row": S}``
  (``start_row`` optional, default 0, an offset inside the rank's rows).
- Backpressure: the stream is a :class:`pyarrow.flight.GeneratorStream`; Flight pulls the next
  record batch only after gRPC accepted the previous one, and gRPC's per-stream flow-control window
  stops accepting when the client does not read. A slow client therefore holds the server at about
  two row groups per stream, never the epoch. Streams are capped (``max_streams``, refused with
  ``busy``) and a stream whose client stopped reading is cancelled after ``idle_timeout_s``
  (packer/serve/streams.py, which also stops the server without waiting for such clients).
- Auth: with a token, a server middleware checks ``authorization: Bearer <token>`` on every call
  (constant-time compare) and refuses the call otherwise. Without a token the server only binds to
  loopback; :func:`make_server` refuses any other interface.
- Actions: ``status`` (streams and their state, clients, counters: packer/serve/status.py), ``info``
  (mode, data_id, epochs, geometry), ``epoch`` (rows of an epoch and per rank, body
  ``{"epoch", "world_size"}``). Other RPCs are refused in one line (``unsupported``).

Errors reach the client as ``FlightServerError`` whose ``extra_info`` names the kind (``bad_ticket``,
``data``, ``internal``, ``busy``, ``unsupported``); :mod:`trainer.flight_client` turns them into
one-line messages. Tickets and action bodies are at most MAX_REQUEST_BYTES of JSON with integer
fields only (no bools, floats or strings; 64-bit range), ``world_size`` at most MAX_WORLD_SIZE.
An unexpected exception is logged with its traceback on the server (logger ``navit.serve``) and
reaches the client as one line,
``navit serve: internal error in … (details in the server log)``, never as a Python traceback.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as fl

from packer.errors import ConfigError, NavitError
from packer.serve.epochs import EpochSource, rank_range
from packer.serve.status import Refused, ServeState
from packer.serve.streams import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_STREAMS, IdleWatchdog, stop_server

log = logging.getLogger("navit.serve")

TICKET_KEYS = ("epoch", "rank", "world_size", "start_row")
EPOCH_ACTION_KEYS = ("epoch", "world_size")
DEFAULT_PORT = 8815
# The most ranks one epoch may be split into. The epoch action's answer has one entry per rank, so
# its cost grows with world_size: at 65536 one call took 83-168 ms and answered 197 KB of JSON
# (22-row epoch, loopback, busy 2-core dev VM); before the cap 10,000,000 took 14.6 s, +767 MB peak
# RSS and a 30 MB answer.
MAX_WORLD_SIZE = 65536
MAX_REQUEST_BYTES = 4096  # a ticket or action body is ~60 bytes of JSON
_INT_LIMIT = 2**63  # epochs and rows are int64 everywhere downstream


# ----------------------------------------------------------------------------------------------------
# Tickets
# ----------------------------------------------------------------------------------------------------


class BadTicket(NavitError):
    """A ticket that is not valid JSON or names an impossible partition."""


@dataclass(frozen=True)
class Ticket:
    epoch: int
    rank: int
    world_size: int
    start_row: int = 0


def _json_object(raw: bytes, what: str, example: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A small JSON object from a client, or BadTicket with a one-line reason. Whatever the bytes —
    deep nesting (RecursionError), integers of thousands of digits (ValueError), megabytes — the
    answer is one line: nothing of the server's internals reaches the client."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise BadTicket(
            f"bad {what}: {len(raw)} bytes, at most {MAX_REQUEST_BYTES} (expected JSON like {example})"
        )
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise BadTicket(f"bad {what}: expected JSON like {example}") from None
    if not isinstance(obj, dict):
        raise BadTicket(f"bad {what}: expected a JSON object like {example}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise BadTicket(f"bad {what}: unknown keys {unknown} (allowed: {list(allowed)})")
    for key, value in obj.items():
        # bool is an int in Python, and 2.7 / "3" are not integers: all refused, as in tickets.
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadTicket(f"bad {what}: '{key}' must be an integer, got {_short(value)}")
        if not -_INT_LIMIT < value < _INT_LIMIT:
            raise BadTicket(f"bad {what}: '{key}' is out of range (more than 64 bits)")
    return obj


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_world_size(world_size: int, what: str) -> None:
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise BadTicket(f"bad {what}: world_size must be in [1, {MAX_WORLD_SIZE}], got {world_size}")


def parse_ticket(raw: bytes) -> Ticket:
    """Ticket bytes → :class:`Ticket`; BadTicket with a one-line reason otherwise."""
    example = '{"epoch": 0, "rank": 0, "world_size": 1, "start_row": 0}'
    obj = _json_object(raw, "ticket", example, TICKET_KEYS)
    for key in ("epoch", "rank", "world_size"):
        if key not in obj:
            raise BadTicket(f"bad ticket: missing '{key}'")
    t = Ticket(obj["epoch"], obj["rank"], obj["world_size"], obj.get("start_row", 0))
    _check_world_size(t.world_size, "ticket")
    if not 0 <= t.rank < t.world_size:
        raise BadTicket(f"bad ticket: rank must be in [0, {t.world_size}), got {t.rank}")
    if t.start_row < 0:
        raise BadTicket(f"bad ticket: start_row must be >= 0, got {t.start_row}")
    return t


# ----------------------------------------------------------------------------------------------------
# Auth
# ----------------------------------------------------------------------------------------------------


class _TokenMiddlewareFactory(fl.ServerMiddlewareFactory):
    """Refuses every call whose ``authorization`` header is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info: fl.CallInfo, headers: dict[str, list[str]]) -> None:
        got = (headers.get("authorization") or [""])[0]
        if isinstance(got, str):
            got = got.encode()
        if not hmac.compare_digest(got, self._expected):
            why = "no token given" if not got else "wrong token"
            raise fl.FlightUnauthenticatedError(
                f"navit serve refused the call: {why} (pass the server's token, e.g. --token-file F)"
            )
        return None


_SUPPORTED = {fl.FlightMethod.DO_GET, fl.FlightMethod.DO_ACTION, fl.FlightMethod.LIST_ACTIONS}


class _CallsFactory(fl.ServerMiddlewareFactory):
    """Answers the RPCs navit does not offer (list_flights, get_flight_info, get_schema, do_put,
    do_exchange, ...) with one line before any handler runs: pyarrow's default handlers, and any
    exception raised in its get_schema, reach the client with a Python traceback. Every other
    call gets a :class:`_CallEnd`."""

    def start_call(self, info: fl.CallInfo, headers: dict[str, list[str]]) -> _CallEnd:
        if info.method not in _SUPPORTED:
            rpc = str(info.method).rsplit(".", 1)[-1].lower()
            raise fl.FlightServerError(
                f"navit serve: {rpc} is not supported "
                "(streams: do_get with a ticket; actions: status, info, epoch)",
                extra_info=b"unsupported",
            )
        return _CallEnd()


class _CallEnd(fl.ServerMiddleware):
    """Runs ``on_end`` when the call is over, however it ended: a stream whose generator never
    started (the client left before its first batch) has no ``finally`` to free its slot."""

    on_end: Any = None

    def call_completed(self, exception: BaseException | None) -> None:
        if self.on_end is not None:
            self.on_end()


# ----------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------


class NavitFlightServer(fl.FlightServerBase):
    """Serves an :class:`~packer.serve.epochs.EpochSource` over Flight."""

    def __init__(
        self,
        source: EpochSource,
        location: str,
        token: str | None = None,
        tls_cert_chain: bytes | None = None,
        tls_private_key: bytes | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        middleware: dict[str, fl.ServerMiddlewareFactory] = {"calls": _CallsFactory()}
        if token:
            middleware["auth"] = _TokenMiddlewareFactory(token)
        tls = [fl.CertKeyPair(tls_cert_chain, tls_private_key)] if tls_cert_chain else None
        super().__init__(location, tls_certificates=tls, middleware=middleware)
        self.source = source
        self.state = ServeState(max_streams=max_streams, idle_timeout_s=idle_timeout_s)
        self._watchdog = IdleWatchdog(self.state, self.port).start()

    def shutdown(self) -> None:
        """pyarrow's shutdown (waits for every call to end); see :meth:`stop` for a bounded one."""
        self._watchdog.stop()
        super().shutdown()

    def stop(self, grace_s: float | None = None) -> tuple[int, bool]:
        """Cancel every stream and shut down within ``grace_s``: (streams cancelled, finished).
        Unlike ``shutdown()``, a client that stopped reading cannot hold it up."""
        self._watchdog.stop()
        return stop_server(self, grace_s) if grace_s is not None else stop_server(self)

    # -- streams ------------------------------------------------------------------------------------

    def do_get(self, context: fl.ServerCallContext, ticket: fl.Ticket) -> fl.GeneratorStream:
        try:
            t = parse_ticket(ticket.ticket)
            n = self.source.epoch_rows(t.epoch)
            lo, hi = rank_range(n, t.rank, t.world_size)
            if t.start_row > hi - lo:
                raise BadTicket(
                    f"bad ticket: start_row {t.start_row} is past the end of rank {t.rank}'s "
                    f"{hi - lo} rows of epoch {t.epoch} (world_size {t.world_size})"
                )
        except NavitError as e:
            raise _flight_error(e) from None
        except Exception as e:
            raise _internal_error("do_get", e) from None
        peer = context.peer()
        try:
            sid = self.state.open(peer, dict(t.__dict__), hi - lo - t.start_row)
        except Refused as e:
            if self.state.stopping:  # transient for the client: it retries, maybe a restarted server
                raise fl.FlightUnavailableError(str(e)) from None
            log.info("refused a stream from %s: %s", peer, e)
            raise fl.FlightServerError(str(e), extra_info=b"busy") from None
        call_end = context.get_middleware("calls")
        if call_end is not None:
            call_end.on_end = lambda: self.state.discard(sid)
        log.info(
            "stream %d: %s epoch %d rank %d/%d rows %d..%d",
            sid, peer, t.epoch, t.rank, t.world_size, lo + t.start_row, hi,
        )  # fmt: skip
        return fl.GeneratorStream(self.source.schema, self._generate(sid, t.epoch, lo + t.start_row, hi))

    def _generate(self, sid: int, epoch: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        # Runs lazily on Flight's thread, one batch per pull: Flight pulls the next batch only once
        # gRPC took the previous one (flow control), which is how the status tells a stalled client
        # from a busy server. The finally clause runs when the stream ends, fails, is cancelled
        # (packer/serve/streams.py) or the client goes away (Flight drops the generator).
        try:
            for batch in self.source.stream(epoch, lo, hi):
                if self.state.stopping:  # transient for the client: it retries (a restarted server)
                    raise fl.FlightUnavailableError("navit serve is shutting down")
                self.state.handed_over(sid)
                yield batch
                self.state.accepted(sid, batch.num_rows, batch.nbytes)
        except fl.FlightError:
            raise
        except NavitError as e:
            raise _flight_error(e) from None
        except Exception as e:
            raise _internal_error(f"stream {sid}", e) from None
        finally:
            s = self.state.close(sid)
            if s is not None:
                how = "done" if s.rows_sent == s.rows_total else "timed out" if s.timed_out else "ended early"
                log.info(
                    "stream %d %s: %d/%d rows, %.1f MB in %.2f s",
                    sid, how, s.rows_sent, s.rows_total, s.bytes_sent / 1e6, time.monotonic() - s.started,
                )  # fmt: skip

    # -- actions ------------------------------------------------------------------------------------

    def list_actions(self, context: fl.ServerCallContext) -> list[tuple[str, str]]:
        return [
            ("status", "streams in progress, rows and bytes served, clients (JSON)"),
            ("info", "mode, epochs, seq_len, patch_size (JSON)"),
            ("epoch", 'rows of an epoch and of each rank; body {"epoch": E, "world_size": W} (JSON)'),
        ]

    def do_action(self, context: fl.ServerCallContext, action: fl.Action) -> Iterator[bytes]:
        try:
            if action.type == "status":
                out: dict[str, Any] = self.state.snapshot()
            elif action.type == "info":
                out = self.source.describe()
            elif action.type == "epoch":
                out = self._epoch_action(action.body.to_pybytes() if action.body else b"")
            else:
                raise BadTicket(f"unknown action {_short(action.type)} (status, info, epoch)")
        except NavitError as e:
            raise _flight_error(e) from None
        except Exception as e:
            raise _internal_error(f"action {_short(action.type)}", e) from None
        return iter([json.dumps(out, sort_keys=True).encode()])

    def _epoch_action(self, body: bytes) -> dict[str, Any]:
        req = _json_object(body or b"{}", "request", '{"epoch": E, "world_size": W}', EPOCH_ACTION_KEYS)
        epoch, world = req.get("epoch", 0), req.get("world_size", 1)
        _check_world_size(world, "request")  # the answer holds one entry per rank: capped
        n = self.source.epoch_rows(epoch)
        ranks = [rank_range(n, r, world) for r in range(world)]
        return {"epoch": epoch, "rows": n, "world_size": world, "rank_rows": [b - a for a, b in ranks]}


def _flight_error(e: NavitError) -> fl.FlightServerError:
    kind = b"bad_ticket" if isinstance(e, BadTicket) else b"data"
    return fl.FlightServerError(str(e), extra_info=kind)


def _internal_error(where: str, e: Exception) -> fl.FlightServerError:
    """An unexpected error: the traceback goes to the server log, the client gets one line without
    paths or code (pyarrow would otherwise send it the whole Python traceback)."""
    log.error("%s failed: %s: %s", where, type(e).__name__, e, exc_info=e)
    return fl.FlightServerError(
        f"navit serve: internal error in {where} ({type(e).__name__}; details in the server log)",
        extra_info=b"internal",
    )


# ----------------------------------------------------------------------------------------------------
# Binding safely
# ----------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from other machines


def _check_port_free(host: str, port: int) -> None:
    """A clear error before gRPC's own (which only says the server 'did not start properly').

    SO_REUSEADDR, as gRPC itself binds: connections of a server that just died (kill -9) linger in
    TIME_WAIT for up to a minute and must not block its restart, while a socket that really
    listens there still makes the bind fail (gRPC also sets SO_REUSEPORT, under which two servers
    could share a port: this check, without it, is what refuses the second)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    bind_host = "127.0.0.1" if host == "localhost" else host.strip("[]")
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise NavitError(
                    f"port {port} on {host} is already in use (another navit serve?); choose --port"
                ) from None
            raise NavitError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def make_server(
    source: EpochSource,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
) -> NavitFlightServer:
    """Bind a server (it accepts calls from now on; ``serve()`` only blocks). Refuses a non-loopback
    interface without a token, and says so when the port is taken."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"--host {host} is reachable from other machines: give --token-file F "
            "(clients then send the same token), or keep the default --host 127.0.0.1"
        )
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    if max_streams < 0:
        raise ConfigError(f"--max-streams must be >= 0 (0 = no cap), got {max_streams}")
    if not (idle_timeout_s >= 0 and idle_timeout_s < float("inf")):
        raise ConfigError(f"--idle-timeout must be >= 0 seconds (0 = never), got {idle_timeout_s}")
    if port:
        _check_port_free(host, port)
    scheme = "grpc+tls" if tls_cert else "grpc+tcp"
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    try:
        return NavitFlightServer(
            source, f"{scheme}://{h}:{port}", token, tls_cert, tls_key, max_streams, idle_timeout_s
        )
    except pa.ArrowException as e:
        msg = str(e).splitlines()[0]
        if tls_cert:
            raise ConfigError(f"cannot start the TLS server (bad --tls-cert/--tls-key?): {msg}") from None
        raise NavitError(f"cannot listen on {host}:{port}: {msg}") from None
