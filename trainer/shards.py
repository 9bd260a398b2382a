"""Reading a pack on disk for training: the shard set, the data order, and the DataLoader stream.

- **Order**: a pure function of ``(seed, epoch, rank, world_size)``. Each epoch reads the shards of
  pack epoch ``epoch % E`` in a seeded permutation, splits their row groups into ``world_size``
  contiguous, row-balanced ranges (one per DDP rank), and passes each rank's rows through a seeded
  bounded shuffle buffer. A rank's epochs follow one another as one endless row stream, cut into
  batches of ``batch_size`` consecutive rows (a batch may straddle two epochs).
- **Workers**: batch ``k`` of a rank's stream is built by DataLoader worker ``k % W``; the DataLoader
  returns worker outputs round-robin, so the batches are the same whatever ``W`` is.

:class:`ShardSource` is the :class:`trainer.batch.BatchSource` over a pack directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from packer import schema
from packer.errors import ConfigError, DataError
from trainer.batch import DataPosition, HostBatch, Rows, _host_collate, _pin, collate_rows

# ----------------------------------------------------------------------------------------------------
# Shard sets: validation and the deterministic per-rank row order
# ----------------------------------------------------------------------------------------------------


@dataclass
class ShardSet:
    """A validated pack directory: its index, and each shard's row groups (from Parquet footers)."""

    root: str
    index: dict[str, Any]
    files: list[str]
    shard_epoch: np.ndarray  # (S,) pack epoch of each shard
    group_rows: list[np.ndarray]  # per shard: rows of each row group
    num_classes: int  # max(len(classes), 1 + largest label seen); 0 if unlabeled
    class_names: list[str] | None = None  # label index -> name, from index.json "classes"

    @property
    def seq_len(self) -> int:
        return int(self.index["seq_len"])

    @property
    def patch_size(self) -> int:
        return int(self.index["patch_size"])

    @property
    def pack_epochs(self) -> int:
        return int(self.shard_epoch.max()) + 1

    def shard_rows(self, s: int) -> int:
        return int(self.group_rows[s].sum())


def open_shard_set(data_dir: str, verify: bool = True) -> ShardSet:
    """Validate a pack directory before training: index, schema version, shard files and checksums.

    Raises DataError with one line naming the first problem (and how many there are)."""
    index = schema.read_index(data_dir)
    shards = index["shards"]
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{data_dir}/{schema.INDEX_FILE}: the shard list is empty (nothing to train on)")
    for entry in shards:
        if not isinstance(entry, dict) or not {"file", "rows", "sha256"} <= set(entry):
            raise DataError(
                f"{data_dir}/{schema.INDEX_FILE}: a shard entry lacks file/rows/sha256: {entry!r}"
            )
    if verify:
        problems = schema.verify_shards(data_dir, index)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(f"{data_dir}: {problems[0]}{more}")
    files, epochs, groups = [], [], []
    max_label = -1
    for entry in shards:
        try:
            pf = schema.open_shard(data_dir, entry["file"])
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{data_dir}/{entry['file']}: cannot open ({_first_line(e)}){_UNVERIFIED}"
            ) from None
        sch = pf.schema_arrow
        meta = sch.metadata or {}
        if meta.get(b"version") != str(schema.FORMAT_VERSION).encode():
            raise DataError(
                f"{data_dir}/{entry['file']}: shard format version {meta.get(b'version', b'?').decode()} "
                f"is not supported (this navit reads version {schema.FORMAT_VERSION})"
            )
        try:
            schema.check_schema(sch, index)
        except DataError as e:
            raise DataError(f"{data_dir}/{entry['file']}: {e}") from None
        rows = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], np.int64)
        if int(rows.sum()) != int(entry["rows"]):
            raise DataError(
                f"{data_dir}/{entry['file']}: {int(rows.sum())} rows but index.json says {entry['rows']}"
            )
        try:
            labels = pf.read(columns=["labels"]).column("labels").combine_chunks().flatten()
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{data_dir}/{entry['file']}: cannot read ({_first_line(e)}){_UNVERIFIED}"
            ) from None
        if len(labels):
            max_label = max(max_label, int(pa.compute.max(labels).as_py()))
        files.append(entry["file"])
        epochs.append(int(entry.get("epoch", 0)))
        groups.append(rows)
    classes = index.get("classes") or None
    num_classes = max(max_label + 1, len(classes or []))
    return ShardSet(data_dir, index, files, np.array(epochs, np.int64), groups, num_classes, classes)


# Appended to read errors: without the sha256 check a damaged shard is found only when it is read.
_UNVERIFIED = "; data.verify=true checks every shard's sha256 up front"


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _rng(*key: int) -> np.random.Generator:
    # A tuple seed: independent, reproducible streams per (seed, epoch, rank, purpose).
    return np.random.default_rng([int(k) for k in key])


def shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a bounded shuffle buffer fed ``0..n-1``: (n,) int64 permutation.

    Fill ``buffer`` slots; then each new input replaces a uniformly drawn slot, whose item is
    emitted; at the end the remaining slots are emitted in a random order. Item ``i`` is never
    emitted before output position ``i - buffer``, so a reader holds at most ~``buffer`` rows."""
    buffer = max(1, min(buffer, n))
    out = np.empty(n, np.int64)
    slots = np.arange(buffer, dtype=np.int64)
    picks = rng.integers(0, buffer, size=max(0, n - buffer))
    for t, j in enumerate(picks):
        out[t] = slots[j]
        slots[j] = buffer + t
    out[n - buffer :] = rng.permutation(slots) if n else slots[:0]
    return out


def rank_epoch_rows(
    shards: ShardSet, epoch: int, seed: int, rank: int, world_size: int, buffer: int
) -> np.ndarray:
    """This rank's rows of training epoch ``epoch`` in order: (N, 2) int64 of (shard, row).

    Pure function of its arguments (and the pack's layout)."""
    parts = []
    for s, g, n in _rank_blocks(shards, epoch, seed, rank, world_size):
        first = int(shards.group_rows[s][:g].sum())
        parts.append(np.stack([np.full(n, s, np.int64), np.arange(first, first + n, dtype=np.int64)], 1))
    rows = np.concatenate(parts)
    order = shuffle_buffer_order(len(rows), buffer, _rng(seed, epoch, 1, rank, world_size))
    return rows[order]


def rank_rows_per_epoch(shards: ShardSet, seed: int, rank: int, world_size: int) -> int:
    """The fewest rows this rank reads in any of the first ``pack_epochs`` training epochs (one
    per pack epoch; later epochs reuse those shards in another order, so differ by a row group at
    most). No pixel reads."""
    return min(
        sum(n for _, _, n in _rank_blocks(shards, e, seed, rank, world_size))
        for e in range(shards.pack_epochs)
    )


def _rank_blocks(
    shards: ShardSet, epoch: int, seed: int, rank: int, world_size: int
) -> list[tuple[int, int, int]]:
    """This rank's (shard, row group, rows) of training epoch ``epoch``, in reading order."""
    pack_epoch = epoch % shards.pack_epochs
    ids = np.flatnonzero(shards.shard_epoch == pack_epoch)
    ids = ids[_rng(seed, epoch, 0).permutation(len(ids))]
    # Row groups in the permuted shard order; split into world_size contiguous row-balanced ranges.
    blocks = [(int(s), g, int(n)) for s in ids for g, n in enumerate(shards.group_rows[s])]
    if len(blocks) < world_size:
        raise DataError(
            f"pack epoch {pack_epoch} has {len(blocks)} row groups, fewer than the {world_size} ranks"
        )
    sizes = np.array([n for _, _, n in blocks], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    total = int(sizes.sum())
    # Cut r starts at the first block beginning at or after r/W of the rows, kept strictly increasing
    # so that every rank gets at least one block: disjoint, complete, balanced to a row group.
    cuts = [0]
    for r in range(1, world_size):
        c = int(np.searchsorted(starts, r * total / world_size, side="left"))
        cuts.append(min(max(c, cuts[-1] + 1), len(blocks) - (world_size - r)))
    cuts.append(len(blocks))
    return blocks[cuts[rank] : cuts[rank + 1]]


# ----------------------------------------------------------------------------------------------------
# Reading rows of a shard set in a given order (each worker reads only the rows of its batches)
# ----------------------------------------------------------------------------------------------------


class _RowReader:
    """Fetches rows by (shard, row), loading each row group at most once per pass.

    ``expect(rows)`` announces the rows that will be requested; when a row group is loaded, the
    announced rows in it are copied out and the group is released, so memory stays about one shuffle
    buffer plus one row group."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self.offsets = [np.concatenate([[0], np.cumsum(g)]) for g in shards.group_rows]
        self.pending: dict[tuple[int, int], list[Any]] = {}  # (shard, row) -> [Rows, uses left]
        self.wanted: dict[tuple[int, int], list[int]] = {}
        self.files: dict[int, Any] = {}
        self.bytes_read = 0

    def expect(self, rows: np.ndarray) -> None:
        for s, r in rows.tolist():
            g = int(np.searchsorted(self.offsets[s], r, side="right")) - 1
            self.wanted.setdefault((s, g), []).append(r)

    def _file(self, s: int) -> Any:
        pf = self.files.get(s)
        if pf is None:
            if len(self.files) >= 8:  # keep a few footers open; files are memory-mapped
                self.files.pop(next(iter(self.files)))
            pf = self.files[s] = schema.open_shard(self.shards.root, self.shards.files[s])
        return pf

    def get(self, s: int, r: int) -> Rows:
        if (s, r) not in self.pending:
            g = int(np.searchsorted(self.offsets[s], r, side="right")) - 1
            try:
                table = self._file(s).read_row_group(g)
                arrays = Rows.from_arrow(table)
            except (OSError, pa.ArrowException) as e:  # a shard damaged after (or without) verify
                where = f"{self.shards.root}/{self.shards.files[s]}"
                raise DataError(
                    f"{where}: row group {g} unreadable ({_first_line(e)}){_UNVERIFIED}"
                ) from None
            self.bytes_read += table.nbytes
            base = int(self.offsets[s][g])
            wanted = self.wanted.pop((s, g), [])
            if r not in wanted:
                wanted.append(r)
            # A row can be announced more than once (it recurs in a later epoch): count uses.
            for rr in wanted:
                entry = self.pending.get((s, rr))
                if entry is None:
                    self.pending[(s, rr)] = [arrays.take(rr - base), 1]
                else:
                    entry[1] += 1
        entry = self.pending[(s, r)]
        entry[1] -= 1
        if entry[1] == 0:
            del self.pending[(s, r)]
        return entry[0]


class ShardStream(torch.utils.data.IterableDataset):
    """A rank's endless stream of batches from a shard set, from ``start`` on.

    Under a DataLoader with W workers, worker w builds batches w, w+W, ... (numbered from
    ``start``); the DataLoader interleaves them back in order."""

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        start: DataPosition = DataPosition(),
        max_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size, self.buffer = rank, world_size, shuffle_buffer
        self.start, self.max_batches = start, max_batches

    def epoch_rows(self, epoch: int) -> np.ndarray:
        return rank_epoch_rows(self.shards, epoch, self.seed, self.rank, self.world_size, self.buffer)

    def batch_plan(self) -> Iterator[tuple[np.ndarray, DataPosition]]:
        """Endless (row ids (B, 2), position after) per batch; metadata only, no pixel reads."""
        epoch, skip = self.start.epoch, self.start.rows
        carry: list[np.ndarray] = []
        have = 0
        while True:
            order = self.epoch_rows(epoch)
            if skip > len(order):
                raise DataError(
                    f"data position {skip} rows is past the end of epoch {epoch} ({len(order)} rows)"
                )
            i = skip
            while i < len(order):
                take = min(self.batch_size - have, len(order) - i)
                carry.append(order[i : i + take])
                have += take
                i += take
                if have == self.batch_size:
                    pos = DataPosition(epoch, i) if i < len(order) else DataPosition(epoch + 1, 0)
                    yield np.concatenate(carry), pos
                    carry, have = [], 0
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[HostBatch]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = _RowReader(self.shards)
        plan = self.batch_plan()
        # Look ahead by one shuffle buffer so that a row group loaded now also serves later batches.
        lookahead = max(1, -(-self.buffer // self.batch_size)) * nw + nw
        queue: list[tuple[int, np.ndarray, DataPosition]] = []
        k = 0
        while self.max_batches is None or k < self.max_batches:
            while len(queue) < lookahead:
                j = k + len(queue)
                ids, pos = next(plan)
                if j % nw == w:
                    reader.expect(ids)
                queue.append((j, ids, pos))
            j, ids, pos = queue.pop(0)
            k += 1
            if j % nw != w:
                continue
            rows = Rows.concat([reader.get(int(s), int(r)) for s, r in ids])
            yield collate_rows(rows, pos)


@dataclass
class ShardSource:
    """Batches from a shard set on local disk or an object store (pyarrow, no Ray)."""

    shards: ShardSet
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    shuffle_buffer: int = 256
    prefetch: int = 2
    pin_memory: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        self.seq_len, self.patch_size = self.shards.seq_len, self.shards.patch_size
        self.num_classes = self.shards.num_classes
        self.class_names = self.shards.class_names
        # Identity of the data for --resume: the shards' checksums, wherever the pack now lives.
        digests = "".join(e["sha256"] for e in self.shards.index["shards"])
        self.fingerprint = f"pack:{schema.sha256_bytes(digests.encode())[:16]}"
        self.description = self.description or f"shards {self.shards.root}"
        # A batch of more rows than this rank reads in an epoch would hold whole epochs, repeated
        # (a 100000-row batch of a 45-row pack grew to 22 GB before the OOM killer ended it).
        # Checked against the smallest rank's share so that every rank refuses (none waits for it).
        w = self.world_size
        have = min(rank_rows_per_epoch(self.shards, self.seed, r, w) for r in range(w))
        if self.batch_size > have:
            whose = "the pack has" if w == 1 else f"with {w} processes a rank reads"
            raise ConfigError(
                f"--batch-size {self.batch_size}: {whose} only {have} rows per epoch of "
                f"{self.shards.root}; use --batch-size {have} or less"
            )

    def stream(self, start: DataPosition = DataPosition()) -> ShardStream:
        return ShardStream(
            self.shards, self.batch_size, self.seed, self.rank, self.world_size, self.shuffle_buffer, start
        )

    def batches(self, start: DataPosition = DataPosition()) -> Iterator[HostBatch]:
        stream = self.stream(start)
        if self.workers == 0:
            for b in stream:
                yield _pin(b) if self.pin_memory else b
            return
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_host_collate,
            prefetch_factor=self.prefetch,
            persistent_workers=False,
            in_order=True,
        )
        for b in loader:
            yield _pin(b) if self.pin_memory else b
