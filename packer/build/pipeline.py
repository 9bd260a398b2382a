"""`navit pack` (:func:`pack`, the build stage's front door): execute a plan as a Ray Data job.

Flow for each epoch: plan (:func:`packer.plan.planner.plan_source`, no pixel decoded) → shard tasks
(:func:`packer.build.layout.shard_tasks`) → ``ray.data.from_items(tasks).map_batches(batch_size=1)`` whose
stateless UDF builds one whole shard (:func:`packer.build.layout.build_shard`) and either writes it
(pack) or returns its bytes (live) → small metadata streamed back to the driver with ``iter_rows``
(:mod:`packer.build.execute`) → images.parquet, rejected.jsonl, index.json (:mod:`packer.build.index`). No
packing state lives in a UDF across batches: the plan already decided every row, which is what makes
the output exact and identical whatever the number of workers.

Written pack (see :mod:`packer.schema` for the format)::

    OUT/shards/shard-NNNNNN.parquet   written by the workers, atomically
    OUT/.navit-pack/state.json        config fingerprint + source, written first (resume check)
    OUT/.navit-pack/shard-NNNNNN.json sidecar per shard: sha256, task digest, placements
    OUT/images.parquet, OUT/rejected.jsonl
    OUT/index.json                    written last: its presence means the pack is complete

``--resume`` (:mod:`packer.build.outdir`) re-plans (deterministic), and keeps a shard only if its
sidecar's task digest equals the new plan's and the file's sha256 equals the sidecar's; everything
else is rebuilt.

Live mode (:func:`packer.build.execute.stream_epoch`) runs the same UDF without writing and yields
the same rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from packer import schema
from packer.build.execute import normalize_source, resolved_shard_rows, run_shard_tasks
from packer.build.index import IMAGES_ROW_GROUP, EpochRecord, _images_and_rejections, build_index
from packer.build.layout import shard_tasks
from packer.build.outdir import (
    OutWriteError,
    _release_if_unused,
    _remove_stale,
    _remove_temp_files,
    as_write_error,
    open_out_dir,
    out_error,
    verified_shard,
    write_error,
)
from packer.build.outlock import OutLock
from packer.config import PackConfig
from packer.errors import DataError
from packer.plan.types import Plan

# ----------------------------------------------------------------------------------------------------
# `navit pack`
# ----------------------------------------------------------------------------------------------------


class Progress:
    """Receives pack events; the CLI renders them (bar on a TTY, log lines otherwise)."""

    def epoch_planned(self, epoch: int, epochs: int, plan: Plan, n_shards: int, reused: int) -> None:
        pass

    def shard_done(self, meta: dict[str, Any], reused: bool) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class PackResult:
    index: dict[str, Any]
    shards_built: int
    shards_reused: int
    seconds: float  # the whole call: Ray start-up, planning, shards, final files
    rejected_by_reason: dict[str, int]
    exec_seconds: float = 0.0  # building shards (Ray Data jobs) only
    images_built: int = 0  # images handled (packed or rejected at pack) in the shards built
    shards_by_node: dict[str, int] = field(default_factory=dict)  # Ray node id -> shards it built


def pack(
    source: str,
    out: str,
    cfg: PackConfig,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    planner: Callable[[str, PackConfig, int], Plan] | None = None,
) -> PackResult:
    """Plan and pack ``source`` into ``out`` for ``cfg.output.epochs`` epochs; returns the index.

    ``planner(source, cfg, epoch)`` overrides the default planner (tests build plans by hand).

    A run that fails before any shard is on disk leaves OUT as it found it (its state file removed,
    the folder too if this run created it), so a wrong SOURCE never locks OUT."""
    from packer.plan.sources import check_source

    check_source(normalize_source(source))  # before OUT is touched
    fs, base = schema.resolve_fs(normalize_source(out))
    try:
        existed = fs.get_file_info(base).type != pafs.FileType.NotFound
    except OSError as e:
        raise out_error(out, e) from None
    held: list[OutLock | None] = []  # set once OUT is ours (locked on local disk)
    try:
        return _pack(
            source,
            out,
            cfg,
            workers=workers,
            ray_address=ray_address,
            resume=resume,
            progress=progress,
            planner=planner,
            held=held,
        )
    except BaseException as e:
        if held:  # never clean up after a run that was refused (the folder is someone else's)
            _remove_temp_files(fs, base)
            _release_if_unused(fs, base, remove_dir=not existed)
        if isinstance(e, OutWriteError):  # disk full, quota, object store unreachable, ...
            raise write_error(out, e) from None
        raise
    finally:
        if held and held[0] is not None:
            held[0].release()


def _pack(
    source: str,
    out: str,
    cfg: PackConfig,
    *,
    workers: int | None,
    ray_address: str | None,
    resume: bool,
    progress: Progress | None,
    planner: Callable[[str, PackConfig, int], Plan] | None,
    held: list[OutLock | None],
) -> PackResult:
    t0 = time.perf_counter()
    progress = progress or Progress()
    # Absolute paths: Ray workers (possibly on other nodes) must not depend on the driver's cwd.
    source, out = normalize_source(source), normalize_source(out)
    try:
        fs, base, lock = open_out_dir(out, cfg, source, resume)
    except OSError as e:  # under a regular file, read-only, no permission, ...
        raise out_error(out, e) from None
    held.append(lock)
    shard_rows = resolved_shard_rows(cfg)
    from packer.ray_runtime import ensure_ray

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ensure_ray(ray_address)  # up front, so its start-up is not counted as shard-building time
    epochs: list[EpochRecord] = []
    next_shard = 0
    built = reused = images_built = 0
    by_node: dict[str, int] = {}
    exec_seconds = 0.0
    scan = None
    if planner is None:
        from packer.plan.planner import scan_source

        # Headers are read once; each epoch only re-draws sizes and drops (cheap, no I/O).
        scan = scan_source(source, cfg, ray_address=ray_address, workers=workers)
    for e in range(cfg.output.epochs):
        if planner is not None:
            plan = planner(source, cfg, e)
        else:
            from packer.plan.planner import make_plan

            plan = make_plan(scan, cfg, e)
        _check_plan(plan, cfg, e)
        tasks = shard_tasks(plan, cfg.seed, shard_rows, first_shard=next_shard)
        record = EpochRecord(e, plan)
        metas: dict[int, dict[str, Any]] = {}
        todo = []
        for t in tasks:
            side = verified_shard(fs, base, t, cfg) if resume else None
            if side is not None:
                metas[side["shard"]] = side
            else:
                todo.append(t)
        progress.epoch_planned(e, cfg.output.epochs, plan, len(tasks), len(metas))
        for side in metas.values():
            progress.shard_done(side, reused=True)
        reused += len(metas)
        t_exec = time.perf_counter()
        for meta, _ in run_shard_tasks(
            todo, cfg, out=out, return_data=False, workers=workers, ray_address=ray_address
        ):
            metas[meta["shard"]] = meta
            built += 1
            images_built += int(meta["images"]) + len(meta["rejections"])
            node = str(meta.pop("node_id", "unknown"))
            by_node[node] = by_node.get(node, 0) + 1
            progress.shard_done(meta, reused=False)
        exec_seconds += time.perf_counter() - t_exec
        record.metas = [metas[json.loads(t)["shard"]] for t in tasks]
        epochs.append(record)
        next_shard += len(tasks)
    images_table, rejected_lines, by_reason = _images_and_rejections(epochs)
    index = build_index(cfg, source, epochs)
    try:
        _remove_stale(fs, base, next_shard)
        schema.atomic_write_bytes(
            fs,
            schema.join(base, schema.IMAGES_FILE),
            schema.table_to_parquet_bytes(images_table, row_group_rows=IMAGES_ROW_GROUP),
        )
        schema.atomic_write_bytes(
            fs, schema.join(base, schema.REJECTED_FILE), "".join(rejected_lines).encode()
        )
        schema.atomic_write_bytes(fs, schema.join(base, schema.INDEX_FILE), schema.dumps_index(index))
    except OSError as e:
        raise as_write_error(e.errno, _first_line(e)) from None
    progress.close()
    return PackResult(
        index, built, reused, time.perf_counter() - t0, by_reason, exec_seconds, images_built, by_node
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_plan(plan: Plan, cfg: PackConfig, epoch: int) -> None:
    if plan.seq_len != cfg.packing.seq_len or plan.patch_size != cfg.packing.patch_size:
        raise DataError(f"epoch {epoch}: plan geometry ({plan.seq_len}, {plan.patch_size}) != config")
    if plan.epoch != epoch:
        raise DataError(f"plan for epoch {plan.epoch} given as epoch {epoch}")
