"""Batch sources fed by record-batch streams rather than a pack on disk: a Flight server
(``flight://HOST:PORT``) and live mode (the packing pipeline runs on Ray, nothing is written).

Anything that can produce a rank's record batches of an epoch from a start row becomes a
:class:`RecordBatchSource`, with the same batch format and position semantics as a shard set.
Ray and the Flight client are imported inside the functions that need them, never at import time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from packer.errors import DataError
from trainer.batch import DataPosition, HostBatch, Rows, _pin, collate_rows


@dataclass
class RecordBatchSource:
    """Batches from any producer of a rank's record batches (shard schema) of an epoch from a row.

    ``epoch_batches(epoch, start_row)`` must yield the rows of ``epoch`` from ``start_row`` on, the
    same rows every time it is called with the same arguments (that is what makes resume exact), and
    stop at the end of the epoch. Used by live mode and the Flight client; record batches are
    consumed in a background thread so producing overlaps training."""

    epoch_batches: Callable[[int, int], Iterator[pa.RecordBatch]]
    batch_size: int
    seq_len: int
    patch_size: int
    num_classes: int = 0
    description: str = "record batches"
    prefetch: int = 4
    pin_memory: bool = False
    max_epochs: int | None = None
    class_names: list[str] | None = None
    fingerprint: str | None = None  # the data's identity for --resume (else the description)

    def _rows(self, start: DataPosition) -> Iterator[tuple[Rows, DataPosition]]:
        epoch, row = start.epoch, start.rows
        while self.max_epochs is None or epoch < self.max_epochs:
            seen = 0
            for rb in self.epoch_batches(epoch, row):
                rows = Rows.from_arrow(rb)
                for i in range(len(rows)):
                    row += 1
                    seen += 1
                    yield rows.take(i), DataPosition(epoch, row)
            if seen == 0 and row == 0:
                raise DataError(f"{self.description}: epoch {epoch} has no rows")
            epoch, row = epoch + 1, 0

    def _batches(self, start: DataPosition) -> Iterator[HostBatch]:
        buf: list[Rows] = []
        for rows, pos in self._rows(start):
            buf.append(rows)
            if len(buf) == self.batch_size:
                # The position after a batch that ends an epoch is the start of the next one.
                yield collate_rows(Rows.concat(buf), pos)
                buf = []

    def batches(self, start: DataPosition = DataPosition()) -> Iterator[HostBatch]:
        import queue

        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            """Hand an item to the consumer; False once the consumer has gone."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            gen = self._batches(start)
            try:
                for b in gen:
                    if not put(_pin(b) if self.pin_memory else b):
                        return
                put(done)
            except BaseException as e:  # surfaced in the consumer thread
                put(e)
            finally:
                gen.close()  # closes the producer's iterators (e.g. a Ray Data stream) in this thread

        t = threading.Thread(target=produce, name="navit-batches", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            # Let the producer finish its current item and close its stream before we return
            # (e.g. before the caller shuts Ray down).
            t.join(timeout=60)


def _flight_source(
    uri: str, batch_size: int, rank: int, world_size: int, prefetch: int, pin: bool, token: str | None
) -> RecordBatchSource:
    from trainer.flight_client import FlightDataClient, flight_batches

    with FlightDataClient(uri, token=token) as client:
        info = client.info()

    def epoch_batches(epoch: int, start_row: int) -> Iterator[pa.RecordBatch]:
        return flight_batches(uri, epoch, rank, world_size, start_row, token)

    return RecordBatchSource(
        epoch_batches,
        batch_size,
        int(info["seq_len"]),
        int(info["patch_size"]),
        int(info.get("num_classes") or 0),
        description=f"flight {uri}",
        prefetch=prefetch,
        pin_memory=pin,
        # The served data's identity (a pack's shard digests, or live source + config + seed), so a
        # resumed run checks the data, not the address: another port with the same data is fine,
        # the same port serving other data is refused. Servers before data_id: the address.
        fingerprint=info.get("data_id"),
    )


def live_source(
    images: str,
    pack_config: Any,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    prefetch: int = 4,
    pin_memory: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
    rejected: Any = None,
) -> RecordBatchSource:
    """Live mode: the packing pipeline runs on Ray and its rows stream straight into the trainer.

    This process is the Ray driver (planning, a few MB of metadata); Ray worker processes decode and
    pack whole shards; the rows come back as Arrow buffers. Training epoch ``e`` is pack epoch ``e``
    (fresh resolution and drop draws every epoch). Under DDP each rank builds every W-th shard of the
    same deterministic plan. Ray is imported here, never at import time. ``rejected``: a
    :class:`trainer.live_rejects.RejectedLog` that receives every input not packed."""
    from packer.build import execute
    from packer.build.layout import shard_tasks
    from packer.ray_runtime import ensure_ray

    # Ray starts here, in the calling (main) thread, not later in the producer thread: the trainer
    # then takes SIGTERM/SIGINT back from Ray (whose handler would print a C-level stack dump).
    ensure_ray(ray_address)
    plan0 = execute.plan_epoch(images, pack_config, 0, ray_address=ray_address, workers=workers)
    labels = np.asarray(getattr(plan0, "label", np.zeros(0)), dtype=np.int64)
    classes = list(getattr(plan0, "classes", []) or [])
    num_classes = max(len(classes), int(labels.max()) + 1 if labels.size else 0)

    def epoch_rows(epoch: int) -> Iterator[pa.RecordBatch]:
        plan = (
            plan0 if epoch == 0 else execute.plan_epoch(images, pack_config, epoch, ray_address=ray_address)
        )
        if rejected is not None and rank == 0:
            rejected.add_plan(plan, epoch)
        if world_size == 1:

            def on_shard(result: Any) -> None:
                if rejected is not None:
                    rejected.add_shard(plan, epoch, result.rejections)

            yield from execute.stream_epoch(
                plan, pack_config, epoch, workers=workers, ray_address=ray_address, on_shard=on_shard
            )
            return
        tasks = shard_tasks(plan, pack_config.seed, execute.resolved_shard_rows(pack_config))
        mine = tasks[rank::world_size]
        for meta, data in execute.run_shard_tasks(
            mine, pack_config, out=None, return_data=True, workers=workers, ray_address=ray_address
        ):
            if rejected is not None:
                rejected.add_shard(plan, epoch, meta["rejections"])
            pf = pq.ParquetFile(pa.BufferReader(data))
            for g in range(pf.num_row_groups):
                yield from pf.read_row_group(g).combine_chunks().to_batches()

    def epoch_batches(epoch: int, start_row: int) -> Iterator[pa.RecordBatch]:
        # Resume: the epoch's rows are deterministic, so skip the ones already consumed.
        skip = start_row
        for rb in epoch_rows(epoch):
            if skip >= rb.num_rows:
                skip -= rb.num_rows
                continue
            yield rb.slice(skip) if skip else rb
            skip = 0

    src = RecordBatchSource(
        epoch_batches,
        batch_size,
        pack_config.packing.seq_len,
        pack_config.packing.patch_size,
        num_classes,
        description=f"live {images} (config {pack_config.fingerprint()})",
        prefetch=prefetch,
        pin_memory=pin_memory,
    )
    src.class_names = classes or None
    return src
