"""Running shard tasks as a Ray Data job, one task per shard: for `navit pack` (written) and live mode.

``ray.data.from_items(tasks).map_batches(batch_size=1)`` whose stateless UDF (:func:`_shard_udf`) builds
one whole shard (:func:`packer.build.layout.build_shard_bytes`) and either writes it with its sidecar
(pack) or returns its bytes (live); small metadata streams back in task order (:func:`run_shard_tasks`).
:func:`stream_epoch` is live mode: the same rows as a pack, as RecordBatches, never written. Ray is
imported inside the functions that run a job, not at import time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from packer import schema
from packer.build.layout import ShardResult, build_shard_bytes, shard_tasks, task_digest
from packer.build.outdir import as_write_error, sidecar_name
from packer.config import PackConfig
from packer.plan.types import Plan


def normalize_source(source: str) -> str:
    """Local paths become absolute (so `pack imgs` and `pack ./imgs` are the same source, and workers
    do not depend on the driver's cwd); URIs stay as they are."""
    import os

    return source if "://" in source else os.path.abspath(source)


def resolved_shard_rows(cfg: PackConfig) -> int:
    return cfg.output.shard_rows or schema.default_shard_rows(cfg.packing.seq_len, cfg.packing.patch_size)


# ----------------------------------------------------------------------------------------------------
# Planning and the Ray job
# ----------------------------------------------------------------------------------------------------


def plan_epoch(
    source: str, cfg: PackConfig, epoch: int, *, ray_address: str | None = None, workers: int | None = None
) -> Plan:
    """The plan of one epoch (header scan → sizes → drop → bins); deterministic in (source, cfg, epoch)."""
    from packer.plan.planner import plan_source

    return plan_source(source, cfg, epoch=epoch, ray_address=ray_address, workers=workers)


def _shard_udf(batch: pa.Table, cfg_json: str, out: str | None, return_data: bool) -> pa.Table:
    """Ray Data UDF, one shard task per call (batch_size=1). Stateless: builds, maybe writes, returns
    small metadata (and the shard bytes in live mode)."""
    task = batch.column("task")[0].as_py()
    cfg = PackConfig.model_validate_json(cfg_json)
    data, result = build_shard_bytes(task, cfg)
    meta = result.to_json()
    meta["sha256"] = schema.sha256_bytes(data)
    meta["task_sha256"] = task_digest(task)
    meta["file"] = schema.shard_file_name(result.shard)
    if out is not None:
        try:
            fs, base = schema.resolve_fs(out)
            schema.atomic_write_bytes(fs, schema.join(base, meta["file"]), data)
            # The sidecar lands after the shard: a shard without a sidecar is simply rebuilt on resume.
            sidecar = dict(meta, fingerprint=cfg.fingerprint())
            blob = json.dumps(sidecar, sort_keys=True, separators=(",", ":")).encode()
            schema.atomic_write_bytes(fs, schema.join(base, sidecar_name(result.shard)), blob)
        except OSError as e:  # disk full, object store unreachable: reported, not a Ray traceback
            text = str(e).strip()
            meta["write_error"] = {"errno": e.errno, "message": text.splitlines()[0] if text else repr(e)}
    # Which Ray node built the shard: reported to the driver (the pack summary counts shards per node)
    # but written nowhere, so the pack's files stay identical whatever the cluster.
    meta["node_id"] = _ray_node_id()
    return pa.table(
        {
            "shard": pa.array([result.shard], pa.int64()),
            "meta": pa.array([json.dumps(meta, sort_keys=True)], pa.string()),
            "data": _one_binary(data if return_data else pa.py_buffer(b"")),
        }
    )


def _ray_node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside a Ray worker (a direct call)
        return "local"


def _one_binary(buf: pa.Buffer) -> pa.Array:
    """A one-element large_binary array over ``buf`` without copying it."""
    offsets = pa.py_buffer(np.array([0, buf.size], dtype=np.int64).tobytes())
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, buf])


def run_shard_tasks(
    tasks: list[str],
    cfg: PackConfig,
    *,
    out: str | None,
    return_data: bool,
    workers: int | None = None,
    ray_address: str | None = None,
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Run shard tasks on Ray Data and yield (metadata, shard bytes or b"") in task order.

    At most ``workers`` shards are built at once; results stream back (nothing is materialised), so
    memory is bounded by shard size × workers plus Ray Data's small output buffer."""
    if not tasks:
        return
    import ray
    from ray.data import DataContext, TaskPoolStrategy

    from packer.ray_runtime import ensure_ray

    # Ray Data logs every execution at INFO (and a warning about its disabled progress bars);
    # navit reports progress itself.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ensure_ray(ray_address)
    DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(
        _shard_udf,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"cfg_json": cfg.model_dump_json(), "out": out, "return_data": return_data},
        num_cpus=1,
        compute=TaskPoolStrategy(size=min(workers, len(tasks))) if workers else None,
        udf_modifying_row_count=False,
    )
    # Re-order defensively (preserve_order already should): the caller gets shards in task order.
    order = [json.loads(t)["shard"] for t in tasks]
    pending: dict[int, tuple[dict[str, Any], bytes]] = {}
    nxt = 0
    for row in ds.iter_rows():
        meta = json.loads(row["meta"])
        if "write_error" in meta:  # the first failed write ends the job (the caller names --out)
            raise as_write_error(meta["write_error"]["errno"], meta["write_error"]["message"])
        pending[int(row["shard"])] = (meta, row["data"])
        while nxt < len(order) and order[nxt] in pending:
            yield pending.pop(order[nxt])
            nxt += 1
    if nxt != len(order):
        raise RuntimeError(f"Ray Data returned {nxt} of {len(order)} shards")


# ----------------------------------------------------------------------------------------------------
# Live mode
# ----------------------------------------------------------------------------------------------------


def stream_epoch(
    source: str | Plan,
    cfg: PackConfig,
    epoch: int = 0,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    on_shard: Callable[[ShardResult], None] | None = None,
    shard_rows: int | None = None,
    start_row: int = 0,
    stop_row: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Packed rows of one epoch, built on the fly and never written: RecordBatches of at most
    ``schema.ROW_GROUP_ROWS`` rows (one per Parquet row group), in row order, with exactly
    :func:`schema.shard_schema`.

    The rows are byte-identical to what `navit pack` writes for the same source, config and seed
    (the bytes go through the same Parquet serialisation). ``source`` is a path/URI (planned here) or
    a ready :class:`Plan`; ``on_shard`` receives each shard's metadata (placements, rejections).

    ``start_row`` / ``stop_row`` restrict the output to the epoch's rows [start_row, stop_row) (only
    the shards that overlap the range are built). ``shard_rows`` (default: the config's) only sets
    the unit of work — smaller means more parallel tasks and a faster first batch. Row contents do
    not depend on it (each row is built on its own); only where RecordBatch boundaries fall does."""
    if isinstance(source, Plan):
        plan = source
    else:
        plan = plan_epoch(normalize_source(source), cfg, epoch, ray_address=ray_address, workers=workers)
    rows_per_task = shard_rows or resolved_shard_rows(cfg)
    stop = plan.num_sequences if stop_row is None else min(stop_row, plan.num_sequences)
    if start_row < 0 or start_row >= stop:
        return
    tasks = shard_tasks(plan, cfg.seed, rows_per_task)
    first = start_row // rows_per_task
    last = (stop - 1) // rows_per_task
    row = first * rows_per_task  # epoch row of the next batch's first row
    for meta, data in run_shard_tasks(
        tasks[first : last + 1], cfg, out=None, return_data=True, workers=workers, ray_address=ray_address
    ):
        if on_shard is not None:
            on_shard(ShardResult.from_json({k: meta[k] for k in _RESULT_KEYS}))
        pf = pq.ParquetFile(pa.BufferReader(data))
        for g in range(pf.num_row_groups):
            for batch in pf.read_row_group(g).combine_chunks().to_batches():
                lo, hi = max(start_row - row, 0), min(stop - row, batch.num_rows)
                row += batch.num_rows
                if lo < hi:
                    yield batch if (lo, hi) == (0, batch.num_rows) else batch.slice(lo, hi - lo)


def epoch_rows(
    source: str | Plan,
    cfg: PackConfig,
    epoch: int = 0,
    *,
    ray_address: str | None = None,
    workers: int | None = None,
) -> int:
    """Rows (packed sequences) of one epoch: the plan's sequence count (pack-time rejections never
    remove a row, so this is exact before anything is decoded)."""
    if isinstance(source, Plan):
        return source.num_sequences
    return plan_epoch(
        normalize_source(source), cfg, epoch, ray_address=ray_address, workers=workers
    ).num_sequences


_RESULT_KEYS = ("shard", "epoch", "rows", "images", "real_tokens", "placements", "rejections")
