"""`navit pack` and the live pipeline: execute a plan as a Ray Data job, one task per shard.

Flow for each epoch: plan (:func:`packer.plan.planner.plan_source`, no pixel decoded) → shard tasks
(:func:`packer.build.layout.shard_tasks`) → ``ray.data.from_items(tasks).map_batches(batch_size=1)`` whose
stateless UDF builds one whole shard (:func:`packer.build.layout.build_shard`) and either writes it (pack)
or returns its bytes (live) → small metadata streamed back to the driver with ``iter_rows``. No
packing state lives in a UDF across batches: the plan already decided every row, which is what makes
the output exact and identical whatever the number of workers.

Written pack (see :mod:`packer.schema` for the format)::

    OUT/shards/shard-NNNNNN.parquet   written by the workers, atomically
    OUT/.navit-pack/state.json        config fingerprint + source, written first (resume check)
    OUT/.navit-pack/shard-NNNNNN.json sidecar per shard: sha256, task digest, placements
    OUT/images.parquet, OUT/rejected.jsonl
    OUT/index.json                    written last: its presence means the pack is complete

``--resume`` re-plans (deterministic), and keeps a shard only if its sidecar's task digest equals
the new plan's and the file's sha256 equals the sidecar's; everything else is rebuilt.

Live mode (:func:`stream_epoch`) runs the same UDF without writing and yields the same rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from packer import schema
from packer.build.layout import ShardResult, build_shard_bytes, shard_tasks, task_digest
from packer.config import PackConfig
from packer.errors import DataError, NavitError
from packer.plan.sources import UNREADABLE_FOLDER, printable
from packer.plan.types import Plan

STATE_DIR = ".navit-pack"
STATE_FILE = f"{STATE_DIR}/state.json"
IMAGES_ROW_GROUP = 65536


def sidecar_name(shard: int) -> str:
    return f"{STATE_DIR}/shard-{shard:06d}.json"


def navit_version() -> str:
    try:
        from importlib.metadata import version

        return version("navit")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


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
        fs, base = schema.resolve_fs(out)
        schema.atomic_write_bytes(fs, schema.join(base, meta["file"]), data)
        # The sidecar lands after the shard: a shard without a sidecar is simply rebuilt on resume.
        sidecar = dict(meta, fingerprint=cfg.fingerprint())
        blob = json.dumps(sidecar, sort_keys=True, separators=(",", ":")).encode()
        schema.atomic_write_bytes(fs, schema.join(base, sidecar_name(result.shard)), blob)
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


# ----------------------------------------------------------------------------------------------------
# The output directory: refusal, resume, clean-up
# ----------------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def _read_json(fs: pafs.FileSystem, path: str) -> Any | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, FileNotFoundError, ValueError):
        return None


def _list(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except (OSError, NotADirectoryError) as e:
        raise NavitError(f"cannot list {path}: {e}") from None


def prepare_out_dir(out: str, cfg: PackConfig, source: str, resume: bool) -> tuple[pafs.FileSystem, str]:
    """Check OUT may be written (empty, or a pack of the same config and source) and mark it as ours.

    Raises NavitError (one line) otherwise. Removes index.json so that its presence keeps meaning
    'complete', and leftover temp files of a killed run."""
    fs, base = schema.resolve_fs(out)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise NavitError(f"--out {out}: is a file, expected a directory")
    entries = _list(fs, base) if info.type == pafs.FileType.Directory else []
    # Only the state of a run that built nothing (e.g. killed while planning): OUT is not locked.
    ours = {STATE_DIR, schema.SHARDS_DIR}
    if entries and {e.base_name for e in entries} <= ours and _holds_no_shard(fs, base):
        entries = []
    if entries:
        state = _read_json(fs, schema.join(base, STATE_FILE))
        if state is None:
            raise NavitError(
                f"--out {out}: directory is not empty and is not a navit pack; refusing to write into it"
            )
        if state.get("fingerprint") != cfg.fingerprint() or state.get("source") != source:
            what = "config" if state.get("fingerprint") != cfg.fingerprint() else "source"
            raise NavitError(
                f"--out {out}: holds a navit pack of a different {what} "
                f"({state.get('source')!r}, config {state.get('fingerprint')}); "
                f"use an empty directory"
            )
        if not resume:
            raise NavitError(
                f"--out {out}: already holds a pack of this config; pass --resume to verify and finish it, "
                f"or use an empty directory"
            )
    fs.create_dir(schema.join(base, STATE_DIR), recursive=True)
    for entry in _list(fs, base, recursive=True):
        if ".tmp-" in entry.base_name and entry.type == pafs.FileType.File:
            fs.delete_file(entry.path)  # a temp file of a killed run
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(schema.join(base, schema.INDEX_FILE))
    state = {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "fingerprint": cfg.fingerprint(),
        "source": source,
        "config": cfg.model_dump(mode="json"),
    }
    schema.atomic_write_bytes(fs, schema.join(base, STATE_FILE), _dumps(state))
    return fs, base


def verified_shard(fs: pafs.FileSystem, base: str, task: str, cfg: PackConfig) -> dict[str, Any] | None:
    """The sidecar metadata of a shard already on disk, if it is exactly what ``task`` would build
    (same task digest, same config) and the file's sha256 matches; otherwise None (rebuild)."""
    shard = json.loads(task)["shard"]
    side = _read_json(fs, schema.join(base, sidecar_name(shard)))
    if not isinstance(side, dict):
        return None
    if side.get("task_sha256") != task_digest(task) or side.get("fingerprint") != cfg.fingerprint():
        return None
    try:
        digest = schema.sha256_file(fs, schema.join(base, schema.shard_file_name(shard)))
    except (FileNotFoundError, OSError):
        return None
    if digest != side.get("sha256"):
        return None
    side.pop("fingerprint", None)
    return side


def _remove_stale(fs: pafs.FileSystem, base: str, n_shards: int) -> None:
    """Delete shard files and sidecars numbered beyond this pack (left by an older, larger plan)."""
    for sub, prefix in ((schema.SHARDS_DIR, "shard-"), (STATE_DIR, "shard-")):
        for entry in _list(fs, schema.join(base, sub)):
            name = entry.base_name
            if not name.startswith(prefix):
                continue
            try:
                idx = int(name[len(prefix) :].split(".", 1)[0])
            except ValueError:
                continue
            if idx >= n_shards:
                fs.delete_file(entry.path)


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
class EpochRecord:
    epoch: int
    plan: Plan
    metas: list[dict[str, Any]] = field(default_factory=list)


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
        )
    except BaseException:
        _release_if_unused(fs, base, remove_dir=not existed)
        raise


def out_error(out: str, e: OSError) -> NavitError:
    """The one-line error for an --out that cannot be written (the OS's reason, without pyarrow's
    'Detail:' text)."""
    import os

    why = os.strerror(e.errno) if e.errno else (str(e).strip().splitlines() or [type(e).__name__])[0]
    return NavitError(f"--out {out}: cannot write the pack there ({why})")


def _holds_no_shard(fs: pafs.FileSystem, base: str) -> bool:
    """True when OUT holds no file but our state file (and temp files): no shard, sidecar, index."""
    for entry in _list(fs, base, recursive=True):
        if entry.type != pafs.FileType.File or ".tmp-" in entry.base_name:
            continue
        if entry.path.rstrip("/") != schema.join(base, STATE_FILE):
            return False
    return True


def _release_if_unused(fs: pafs.FileSystem, base: str, remove_dir: bool) -> None:
    """After a failed run: if OUT holds no shard, remove what this run wrote (the state folder, an
    empty shards/ folder, and OUT itself when the run created it and it is now empty)."""
    try:
        if fs.get_file_info(base).type != pafs.FileType.Directory or not _holds_no_shard(fs, base):
            return
        for sub in (STATE_DIR, schema.SHARDS_DIR):
            if fs.get_file_info(schema.join(base, sub)).type == pafs.FileType.Directory:
                fs.delete_dir(schema.join(base, sub))  # only temp files or nothing left in it
        if remove_dir and not _list(fs, base):
            fs.delete_dir(base)
    except (OSError, NavitError):  # best effort: never hide the error that failed the run
        pass


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
) -> PackResult:
    t0 = time.perf_counter()
    progress = progress or Progress()
    # Absolute paths: Ray workers (possibly on other nodes) must not depend on the driver's cwd.
    source, out = normalize_source(source), normalize_source(out)
    try:
        fs, base = prepare_out_dir(out, cfg, source, resume)
    except OSError as e:  # under a regular file, read-only, no permission, ...
        raise out_error(out, e) from None
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
    _remove_stale(fs, base, next_shard)
    images_table, rejected_lines, by_reason = _images_and_rejections(epochs)
    schema.atomic_write_bytes(
        fs,
        schema.join(base, schema.IMAGES_FILE),
        schema.table_to_parquet_bytes(images_table, row_group_rows=IMAGES_ROW_GROUP),
    )
    schema.atomic_write_bytes(fs, schema.join(base, schema.REJECTED_FILE), "".join(rejected_lines).encode())
    index = build_index(cfg, source, epochs)
    schema.atomic_write_bytes(fs, schema.join(base, schema.INDEX_FILE), schema.dumps_index(index))
    progress.close()
    return PackResult(
        index, built, reused, time.perf_counter() - t0, by_reason, exec_seconds, images_built, by_node
    )


def _check_plan(plan: Plan, cfg: PackConfig, epoch: int) -> None:
    if plan.seq_len != cfg.packing.seq_len or plan.patch_size != cfg.packing.patch_size:
        raise DataError(f"epoch {epoch}: plan geometry ({plan.seq_len}, {plan.patch_size}) != config")
    if plan.epoch != epoch:
        raise DataError(f"plan for epoch {plan.epoch} given as epoch {epoch}")


def _augment_record(plan: Plan, i: int) -> dict[str, Any]:
    """images.parquet's augmentation columns of plan position i (whole image, unflipped when off)."""
    x0, y0, x1, y1 = plan.crop_box(i)
    return {"crop_x0": x0, "crop_y0": y0, "crop_x1": x1, "crop_y1": y1, "hflip": plan.flipped(i)}


def _images_and_rejections(epochs: list[EpochRecord]) -> tuple[pa.Table, list[str], dict[str, int]]:
    """images.parquet (one row per input image per epoch, sorted by epoch then image_id),
    rejected.jsonl lines, and rejection counts by reason."""
    cols: dict[str, list[Any]] = {f.name: [] for f in schema.IMAGES_SCHEMA}
    lines: list[str] = []
    by_reason: dict[str, int] = {}
    for rec in epochs:
        plan = rec.plan
        place: dict[int, tuple[int, int, int]] = {}
        failed: dict[int, str] = {}
        for m in rec.metas:
            for image_id, row, seg in m["placements"]:
                place[int(image_id)] = (int(m["shard"]), int(row), int(seg))
            for image_id, reason in m["rejections"]:
                failed[int(image_id)] = reason
        rows: list[tuple[int, dict[str, Any]]] = []
        for i in range(len(plan.image_id)):
            iid = int(plan.image_id[i])
            shard, row, seg = place.get(iid, (-1, -1, -1))
            reason = failed.get(iid)
            if reason is None and shard < 0:
                reason = "internal: planned but not placed"  # never expected; never silently lost
            rows.append(
                (
                    iid,
                    {
                        "epoch": rec.epoch,
                        "image_id": iid,
                        "path": plan.path[i],
                        "label": int(plan.label[i]),
                        "orig_h": int(plan.orig_h[i]),
                        "orig_w": int(plan.orig_w[i]),
                        "grid_h": int(plan.grid_h[i]),
                        "grid_w": int(plan.grid_w[i]),
                        "n_tokens_full": int(plan.n_full[i]),
                        "n_tokens": int(plan.n_kept[i]),
                        "shard": shard,
                        "row": row,
                        "segment": seg,
                        "rejected_reason": reason,
                        **_augment_record(plan, i),
                    },
                )
            )
        for rej in plan.rejected:
            rows.append(
                (
                    int(rej.image_id),
                    {
                        "epoch": rec.epoch,
                        "image_id": int(rej.image_id),
                        "path": rej.path,
                        "label": int(rej.label),
                        "orig_h": int(rej.orig_h),
                        "orig_w": int(rej.orig_w),
                        "grid_h": -1,
                        "grid_w": -1,
                        "n_tokens_full": -1,
                        "n_tokens": -1,
                        "shard": -1,
                        "row": -1,
                        "segment": -1,
                        "rejected_reason": rej.reason,
                        **dict.fromkeys(("crop_x0", "crop_y0", "crop_x1", "crop_y1"), -1),
                        "hflip": False,
                    },
                )
            )
        rows.sort(key=lambda r: r[0])
        for _, r in rows:
            # Valid UTF-8 in the output files: a name that is not shows its bytes as \xNN.
            r["path"] = printable(r["path"])
            if r["rejected_reason"] is not None:
                r["rejected_reason"] = printable(r["rejected_reason"])
            for k, v in r.items():
                cols[k].append(v)
            if r["rejected_reason"] is not None:
                lines.append(
                    json.dumps({"path": r["path"], "reason": r["rejected_reason"], "epoch": rec.epoch}) + "\n"
                )
                by_reason[r["rejected_reason"]] = by_reason.get(r["rejected_reason"], 0) + 1
    table = pa.Table.from_pydict(cols, schema=schema.IMAGES_SCHEMA)
    return table, lines, by_reason


def _epoch_totals(rec: EpochRecord, seq_len: int) -> dict[str, Any]:
    plan = rec.plan
    packed = sum(int(m["images"]) for m in rec.metas)
    pack_rejected = sum(len(m["rejections"]) for m in rec.metas)
    plan_rejected = len(plan.rejected)
    sequences = sum(int(m["rows"]) for m in rec.metas)
    real = sum(int(m["real_tokens"]) for m in rec.metas)
    padding = sequences * seq_len - real
    lb = math.ceil(real / seq_len) if real else 0
    return {
        "epoch": rec.epoch,
        "images_in": len(plan.image_id) + plan_rejected,
        "images_packed": packed,
        "images_rejected": plan_rejected + pack_rejected,
        "images_rejected_at_plan": plan_rejected,
        "images_rejected_at_pack": pack_rejected,
        # Folders that could not be listed (each one rejected input; the images in them are unknown).
        "folders_unreadable": sum(r.reason.startswith(UNREADABLE_FOLDER + ":") for r in plan.rejected),
        "sequences": sequences,
        "real_tokens": real,
        "padding_tokens": padding,
        "padding_fraction": padding / (sequences * seq_len) if sequences else 0.0,
        "lower_bound_sequences": lb,
        "shards": len(rec.metas),
    }


def build_index(cfg: PackConfig, source: str, epochs: list[EpochRecord]) -> dict[str, Any]:
    """index.json content. Deterministic: no timings, hosts or worker counts in it."""
    seq_len = cfg.packing.seq_len
    per_epoch = [_epoch_totals(rec, seq_len) for rec in epochs]
    totals: dict[str, Any] = {}
    for key in (
        "images_in",
        "images_packed",
        "images_rejected",
        "images_rejected_at_plan",
        "images_rejected_at_pack",
        "folders_unreadable",
        "sequences",
        "real_tokens",
        "padding_tokens",
        "lower_bound_sequences",
        "shards",
    ):
        totals[key] = sum(int(t[key]) for t in per_epoch)
    cap = totals["sequences"] * seq_len
    totals["padding_fraction"] = totals["padding_tokens"] / cap if cap else 0.0
    lb = totals["lower_bound_sequences"]
    totals["excess_over_lower_bound"] = (totals["sequences"] - lb) / lb if lb else 0.0
    shards = [
        {
            "file": m["file"],
            "epoch": int(m["epoch"]),
            "rows": int(m["rows"]),
            "images": int(m["images"]),
            "real_tokens": int(m["real_tokens"]),
            "sha256": m["sha256"],
        }
        for rec in epochs
        for m in rec.metas
    ]
    classes = epochs[0].plan.classes if epochs else []
    return {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "navit_version": navit_version(),
        "config": cfg.model_dump(mode="json"),
        "fingerprint": cfg.fingerprint(),
        "source": source,
        "seed": cfg.seed,
        "seq_len": seq_len,
        "patch_size": cfg.packing.patch_size,
        "channels": schema.CHANNELS,
        "max_images_per_seq": cfg.packing.max_images_per_seq,
        "shard_rows": resolved_shard_rows(cfg),
        "epochs": len(epochs),
        "classes": list(classes),
        "shards": shards,
        "totals": totals,
        "per_epoch": per_epoch,
    }
