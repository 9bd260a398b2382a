"""What `navit serve` serves: an epoch as an ordered stream of shard rows, split between trainer ranks.

Two sources share one interface (:class:`EpochSource`):

- :class:`ShardSetSource` — an existing pack directory (``navit pack`` output), read by Parquet row
  group, memory-mapped when local. Epochs are the ones the pack holds.
- :class:`LiveSource` — the live packing pipeline over a raw image SOURCE (plan + Ray execution,
  nothing written to disk). Any epoch ≥ 0 is valid: each has its own plan (NaViT resamples per epoch).

The partition (documented in docs/serve.md, relied on by exact resume) is *contiguous and balanced*:
an epoch of N rows in pack order is cut into ``world_size`` consecutive ranges whose sizes differ by
at most one row; rank k gets rows ``[k·N // W, (k+1)·N // W)``. Ranges are disjoint, their union is
the epoch, and contiguity lets each rank read only its own row groups. ``start_row`` is an offset
inside the rank's range.

The Flight transport itself (auth, status, backpressure) lives in packer/serve/flight.py.
This module imports neither Ray nor torch at import time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from packer import schema
from packer.errors import DataError


def rank_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n_rows`` epoch that belong to ``rank`` of ``world_size``.

    Balanced contiguous split: sizes are ⌊N/W⌋ or ⌈N/W⌉, in rank order."""
    return (rank * n_rows) // world_size, ((rank + 1) * n_rows) // world_size


class EpochSource(Protocol):
    """An ordered, deterministic sequence of packed rows per epoch, all with one shard schema."""

    mode: str  # "shards" or "live"
    schema: pa.Schema  # exactly schema.shard_schema(seq_len, patch_size), metadata included

    def epochs(self) -> list[int] | None:
        """The epochs that exist, or None when any epoch ≥ 0 can be produced (live)."""
        ...

    def epoch_rows(self, epoch: int) -> int:
        """Rows (packed sequences) in ``epoch``; DataError if the epoch does not exist."""
        ...

    def stream(self, epoch: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Rows ``[lo, hi)`` of ``epoch`` as record batches, produced lazily (a row group at a time)."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for the Flight "info" action."""
        ...


def check_epoch(epoch: int, known: list[int] | None) -> None:
    if epoch < 0 or (known is not None and epoch not in known):
        have = "any epoch >= 0" if known is None else _ranges(known)
        raise DataError(f"unknown epoch {epoch}: this server has {have}")


def _ranges(values: list[int]) -> str:
    if not values:
        return "no epochs"
    if values == list(range(values[0], values[-1] + 1)):
        return f"epoch {values[0]}" if len(values) == 1 else f"epochs {values[0]}..{values[-1]}"
    return "epochs " + ",".join(map(str, values))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _as_batches(table: pa.Table, sch: pa.Schema) -> Iterator[pa.RecordBatch]:
    """A (possibly chunked) table → record batches carrying exactly ``sch`` (with its metadata)."""
    for batch in table.to_batches():
        if batch.num_rows:
            yield pa.RecordBatch.from_arrays(batch.columns, schema=sch)


# ----------------------------------------------------------------------------------------------------
# An existing shard set
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardSpan:
    file: str
    first: int  # index of this shard's first row inside its epoch
    rows: int


class ShardSetSource:
    """Serves a pack directory. Opening checks index.json, each shard's footer (schema and row count
    against the index); ``verify=True`` also re-hashes every shard (sha256, reads all bytes)."""

    mode = "shards"

    def __init__(self, data_dir: str, verify: bool = False) -> None:
        self.data_dir = data_dir
        self.index = schema.read_index(data_dir)
        self.schema = schema.shard_schema(
            self.index["seq_len"], self.index["patch_size"], self.index.get("channels", schema.CHANNELS)
        )
        if verify:
            problems = schema.verify_shards(data_dir, self.index)
            if problems:
                raise DataError(f"{data_dir}: {len(problems)} bad shard(s), first: {problems[0]}")
        self._spans: dict[int, list[_ShardSpan]] = {}
        self.num_classes = 0  # 1 + the largest label (0 when unlabeled)
        for entry in self.index["shards"]:
            epoch = int(entry.get("epoch", 0))
            spans = self._spans.setdefault(epoch, [])
            first = spans[-1].first + spans[-1].rows if spans else 0
            pf = self._open(entry["file"])
            schema.check_schema(pf.schema_arrow, self.index)
            if pf.metadata.num_rows != entry["rows"]:
                got, want = pf.metadata.num_rows, entry["rows"]
                raise DataError(f"{data_dir}/{entry['file']}: {got} rows, index.json says {want}")
            spans.append(_ShardSpan(entry["file"], first, int(entry["rows"])))
            # Classes for trainers that size their head from the server (labels is a small column).
            try:
                labels = pf.read(columns=["labels"]).column("labels").combine_chunks().flatten()
            except (OSError, pa.ArrowException) as e:
                why = _first_line(e)
                raise DataError(f"{data_dir}/{entry['file']}: cannot read labels ({why})") from None
            if len(labels):
                self.num_classes = max(self.num_classes, int(pa.compute.max(labels).as_py()) + 1)

    def _open(self, file: str) -> Any:
        try:
            # Buffered reads, not mmap: a stream's resident memory is then its row groups in flight,
            # not the pages of the whole shard it has touched (page cache serves repeats either way).
            return schema.open_shard(self.data_dir, file, memory_map=False)
        except (OSError, pa.ArrowException) as e:  # missing, truncated (no footer), not Parquet
            raise DataError(f"{self.data_dir}/{file}: cannot open shard ({_first_line(e)})") from None

    def epochs(self) -> list[int]:
        return sorted(self._spans)

    def epoch_rows(self, epoch: int) -> int:
        check_epoch(epoch, self.epochs())
        spans = self._spans[epoch]
        return spans[-1].first + spans[-1].rows if spans else 0

    def stream(self, epoch: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        check_epoch(epoch, self.epochs())
        for span in self._spans[epoch]:
            a, b = max(lo, span.first), min(hi, span.first + span.rows)
            if a >= b:
                continue
            yield from self._stream_shard(span.file, a - span.first, b - span.first)

    def _stream_shard(self, file: str, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        # One row group in memory at a time: the generator is pulled by Flight only as fast as the
        # client drains the stream, so a slow client holds the server at ~one row group.
        pf = self._open(file)
        first = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            a, b = max(lo, first), min(hi, first + n)
            if a < b:
                try:
                    table = pf.read_row_group(g)
                except (OSError, pa.ArrowException) as e:  # a damaged page (footer intact)
                    raise DataError(
                        f"{self.data_dir}/{file}: cannot read row group {g} ({_first_line(e)}); "
                        "check the pack with --verify"
                    ) from None
                yield from _as_batches(table.slice(a - first, b - a), self.schema)
            first += n
            if first >= hi:
                break

    def data_id(self) -> str:
        """The pack's identity, wherever it lives: its shards' digests. The same value as
        trainer.shards.ShardSource.fingerprint (tests/test_serve_reliability.py checks they agree),
        so ``navit train --resume`` accepts a run begun on the pack itself or from any server of it."""
        digests = "".join(e["sha256"] for e in self.index["shards"])
        return f"pack:{schema.sha256_bytes(digests.encode())[:16]}"

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "data": self.data_dir,
            "data_id": self.data_id(),
            "epochs": self.epochs(),
            "rows_per_epoch": {str(e): self.epoch_rows(e) for e in self.epochs()},
            "seq_len": self.index["seq_len"],
            "patch_size": self.index["patch_size"],
            "channels": self.index.get("channels", schema.CHANNELS),
            "num_classes": self.num_classes,
        }


# ----------------------------------------------------------------------------------------------------
# The live pipeline (plan + Ray execution)
# ----------------------------------------------------------------------------------------------------


class LiveSource:
    """Serves the live packing pipeline over a raw image source; nothing is written to disk.

    Rows come from :func:`packer.build.execute.stream_epoch` restricted to each rank's range (only the
    shards overlapping it are built), so epoch e here equals epoch e of ``navit pack`` with the same
    source, config and seed, byte for byte. Each epoch is planned once (header scan, no decoding)
    and the plan is shared by every rank's stream; the last few plans are kept. Ray starts lazily."""

    mode = "live"
    PLANS_KEPT = 4

    def __init__(
        self,
        source: str,
        config: Any,
        ray_address: str | None = None,
        workers: int | None = None,
    ) -> None:
        self.config = config
        self.ray_address = ray_address
        self.workers = workers
        self.schema = schema.shard_schema(config.packing.seq_len, config.packing.patch_size)
        self._lock = threading.Lock()
        self._plans: dict[int, Any] = {}  # epoch → Plan, insertion-ordered (oldest first)
        self._pipeline = self._import_pipeline()  # fail at start-up, not on the first client
        self.source = self._pipeline.normalize_source(source)

    @staticmethod
    def _import_pipeline() -> Any:
        try:
            from packer.build import execute
        except ImportError as e:  # the pack pipeline is a separate module
            raise DataError(f"live mode needs packer.build.execute ({e})") from None
        return execute

    def epochs(self) -> None:
        return None

    def plan(self, epoch: int) -> Any:
        """The epoch's plan (deterministic in source, config, epoch), computed once."""
        check_epoch(epoch, None)
        with self._lock:  # two ranks asking for a new epoch at once plan it once
            if epoch not in self._plans:
                from packer.ray_runtime import ensure_ray

                ensure_ray(self.ray_address, self.workers)
                self._plans[epoch] = self._pipeline.plan_epoch(
                    self.source, self.config, epoch, ray_address=self.ray_address, workers=self.workers
                )
                while len(self._plans) > self.PLANS_KEPT:
                    self._plans.pop(next(iter(self._plans)))
            return self._plans[epoch]

    def epoch_rows(self, epoch: int) -> int:
        return int(self.plan(epoch).num_sequences)

    def stream(self, epoch: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        if lo >= hi:
            return
        batches = self._pipeline.stream_epoch(
            self.plan(epoch),
            self.config,
            epoch,
            workers=self.workers,
            ray_address=self.ray_address,
            start_row=lo,
            stop_row=hi,
        )
        for batch in batches:
            yield pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)

    def data_id(self) -> str:
        """What this server's rows are a function of: the source and the resolved config (seed
        included); ``navit train --resume`` over Flight compares it, not the server's address."""
        blob = f"{self.source}\n{self.config.fingerprint()}".encode()
        return f"live:{schema.sha256_bytes(blob)[:16]}"

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "source": self.source,
            "data_id": self.data_id(),
            "epochs": None,
            "seq_len": self.config.packing.seq_len,
            "patch_size": self.config.packing.patch_size,
            "channels": schema.CHANNELS,
            "seed": self.config.seed,
            # Classes of the source's labelling (planning epoch 0 lists them; 0 when unlabeled).
            "num_classes": len(self.plan(0).classes),
        }
