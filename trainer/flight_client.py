"""Client of `navit serve`: packed rows over Arrow Flight, for trainers with no Ray and no images.

Depends only on pyarrow and packer.schema (no Ray, no torch, no pydantic). Record batches arrive
with exactly the shard schema (packer/schema.py), so ``schema.table_to_arrays(batch)`` gives the
same numpy arrays as reading shards.

Usage for your own loop::

    from trainer.flight_client import flight_batches
    for batch in flight_batches("flight://gpu-feeder:8815", epoch=0, rank=r, world_size=w,
                                start_row=rows_done, token=open("token").read().strip()):
        arrays = schema.table_to_arrays(batch)      # patches (R, L, p*p*3) uint8, ...
        rows_done += batch.num_rows                 # save this in the checkpoint for exact resume

URIs: ``flight://HOST:PORT`` (plain gRPC) or ``flight+tls://HOST:PORT`` (TLS; pass
``tls_root_cert`` for a self-signed server); ``grpc://``, ``grpc+tcp://``, ``grpc+tls://`` also work.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as fl

from packer import schema
from packer.errors import ConfigError, DataError, NavitError

log = logging.getLogger("navit.flight_client")

_SCHEMES = {
    "flight": "grpc+tcp",
    "flight+tls": "grpc+tls",
    "grpc": "grpc+tcp",
    "grpc+tcp": "grpc+tcp",
    "grpc+tls": "grpc+tls",
}
# Errors worth reconnecting after (the server restarted, the network blinked); others are final.
_TRANSIENT = (fl.FlightUnavailableError, fl.FlightInternalError, fl.FlightTimedOutError)


def parse_uri(uri: str) -> str:
    """``flight://host:port`` → the gRPC location Flight expects; ConfigError when malformed."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in _SCHEMES or not rest or ":" not in rest:
        raise ConfigError(f"{uri!r}: expected flight://HOST:PORT or flight+tls://HOST:PORT")
    return f"{_SCHEMES[scheme]}://{rest.rstrip('/')}"


def is_flight_uri(data: str) -> bool:
    """True when a --data value names a Flight server rather than a directory."""
    return data.partition("://")[0] in _SCHEMES


def read_token_file(path: str | Path) -> str:
    """The token in a file (surrounding whitespace stripped); ConfigError if missing or empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"--token-file {path}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {path}: the file is empty")
    if any(c.isspace() for c in token):
        raise ConfigError(f"--token-file {path}: the token must be one word (no spaces or newlines)")
    return token


_ACTION_RETRIES = 2  # extra tries of an action that found the connection closed (0.2 s, then 0.4 s)


def _message(e: fl.FlightError | pa.ArrowException) -> str:
    """The server's one-line message without gRPC's debug context."""
    text = str(e).split(". Detail:")[0].split(". gRPC client debug context")[0]
    return text.splitlines()[0] if text else type(e).__name__


class FlightDataClient:
    """One connection to a `navit serve` server (thread-safe for concurrent calls, like Flight)."""

    def __init__(
        self,
        uri: str,
        token: str | None = None,
        tls_root_cert: bytes | None = None,
        action_timeout_s: float | None = None,
    ) -> None:
        self.uri = uri
        self.location = parse_uri(uri)
        kwargs: dict[str, Any] = {}
        if tls_root_cert is not None:
            kwargs["tls_root_certs"] = tls_root_cert
        self._client = fl.FlightClient(self.location, **kwargs)
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = fl.FlightCallOptions(headers=headers)
        # No default timeout: on a live server the first info/epoch call plans the epoch (and may
        # start Ray), which can take minutes on a large source.
        self._action_options = fl.FlightCallOptions(headers=headers, timeout=action_timeout_s)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FlightDataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, e: Exception) -> NavitError:
        msg = _message(e)  # type: ignore[arg-type]
        if isinstance(e, fl.FlightUnauthenticatedError):
            return NavitError(f"{self.uri}: {msg}")
        if isinstance(e, fl.FlightUnavailableError):
            return NavitError(f"{self.uri}: server unavailable (is `navit serve` running there?)")
        if isinstance(e, (fl.FlightServerError, pa.ArrowInvalid)):
            return DataError(f"{self.uri}: {msg}")
        return NavitError(f"{self.uri}: {type(e).__name__}: {msg}")

    def _action(self, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = json.dumps(body or {}).encode()
        # navit's actions only read, so retrying is safe: a server that closed this connection (its
        # idle timeout ended a stalled stream on it) answers UNAVAILABLE once while gRPC reconnects.
        for attempt in range(_ACTION_RETRIES + 1):
            try:
                results = list(self._client.do_action(fl.Action(name, payload), options=self._action_options))
                break
            except fl.FlightUnavailableError as e:
                if attempt == _ACTION_RETRIES:
                    raise self._error(e) from None
                time.sleep(0.2 * (attempt + 1))
            except (fl.FlightError, pa.ArrowException) as e:
                raise self._error(e) from None
        return json.loads(results[0].body.to_pybytes())

    def status(self) -> dict[str, Any]:
        """Streams in progress, rows/bytes served, clients (the server's ``status`` action)."""
        return self._action("status")

    def info(self) -> dict[str, Any]:
        """Mode ("shards"/"live"), epochs (None = any), seq_len, patch_size, channels."""
        return self._action("info")

    def served_epoch(self, epoch: int) -> int:
        """The server epoch that training epoch ``epoch`` reads: itself on a live server, else the
        server's epochs cycled (``epochs[epoch % len(epochs)]``)."""
        epochs = self.info().get("epochs")
        if not epochs or epoch < 0:
            return epoch
        return int(epochs[epoch % len(epochs)])

    def epoch_rows(self, epoch: int, world_size: int = 1) -> dict[str, Any]:
        """``{"rows": N, "rank_rows": [n_0, ...]}`` for ``epoch`` split over ``world_size`` ranks."""
        return self._action("epoch", {"epoch": epoch, "world_size": world_size})

    def batches(
        self,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_row: int = 0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> Iterator[pa.RecordBatch]:
        """This rank's rows of ``epoch`` from ``start_row`` on, as record batches with the shard schema.

        On a transient failure (server restarted, connection lost) it reconnects up to ``retries``
        times in a row with ``start_row`` advanced past the rows already yielded, so the rows seen
        are exactly those of an uninterrupted stream."""
        done = start_row
        failures = 0
        while True:
            ticket = {"epoch": epoch, "rank": rank, "world_size": world_size, "start_row": done}
            try:
                reader = self._client.do_get(fl.Ticket(json.dumps(ticket).encode()), options=self._options)
                limits = _check_stream_schema(reader.schema, self.uri)
                for chunk in reader:
                    batch = chunk.data
                    if batch.num_rows == 0:
                        continue
                    _check_batch(batch, chunk.app_metadata, limits, f"{self.uri}: epoch {epoch} row {done}")
                    failures = 0
                    done += batch.num_rows
                    yield batch
                return
            except _TRANSIENT as e:
                failures += 1
                if failures > retries:
                    raise self._error(e) from None
                log.warning("%s: %s; reconnecting at row %d", self.uri, _message(e), done)
                time.sleep(backoff_s * 2 ** (failures - 1))
            except (fl.FlightError, pa.ArrowException) as e:
                raise self._error(e) from None


def _check_batch(batch: pa.RecordBatch, app_metadata: Any, limits: schema.RowLimits, where: str) -> None:
    """Every batch is checked before it is used: the CRC32 of each row that the server sends beside
    it (corruption in transit or in the server's memory; servers before it send none) and the
    bounds of its metadata (a corrupt label or grid must not size anything)."""
    problem = schema.check_crc_metadata(batch, app_metadata)
    if problem:
        raise DataError(f"{where}: {problem}")
    schema.check_rows(batch, limits, where)


def _check_stream_schema(sch: pa.Schema, uri: str) -> schema.RowLimits:
    meta = sch.metadata or {}
    if meta.get(b"format") != schema.FORMAT_NAME.encode():
        raise DataError(f"{uri}: the stream is not navit packed rows (schema format {meta.get(b'format')!r})")
    if meta.get(b"version") != str(schema.FORMAT_VERSION).encode():
        raise DataError(
            f"{uri}: format version {meta.get(b'version', b'?').decode()} is not supported "
            f"(this navit reads version {schema.FORMAT_VERSION})"
        )
    index = {k: int(meta[k.encode()]) for k in ("seq_len", "patch_size", "channels")}
    schema.check_schema(sch, index)
    return schema.RowLimits(seq_len=index["seq_len"])


def flight_batches(
    uri: str,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_row: int = 0,
    token: str | None = None,
    *,
    tls_root_cert: bytes | None = None,
    retries: int = 3,
    wrap_epochs: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Rows ``start_row…`` of this rank's partition of ``epoch`` from a `navit serve` at ``uri``.

    The partition is contiguous and balanced: of an epoch's N rows, rank k gets rows
    ``[k·N // W, (k+1)·N // W)``. Record the rows consumed and pass them back as ``start_row``
    to resume exactly.

    ``wrap_epochs``: a shard-set server holds a fixed list of pack epochs; training epoch ``e``
    then reads pack epoch ``epochs[e % len(epochs)]`` (as `navit train` does with a pack directory).
    A live server makes every epoch. With ``wrap_epochs=False`` an epoch the server lacks is an error."""
    client = FlightDataClient(uri, token=token, tls_root_cert=tls_root_cert)
    try:
        served = client.served_epoch(epoch) if wrap_epochs else epoch
        yield from client.batches(served, rank, world_size, start_row, retries=retries)
    finally:
        client.close()
