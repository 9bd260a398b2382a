"""The pack's output directory: refusal, the resume check, clean-up (`navit pack --out`).

:func:`prepare_out_dir` accepts OUT only when it is empty or a pack of the same config and source, and
marks it as ours (``.navit-pack/state.json``); :func:`verified_shard` says whether a shard already on disk
is exactly what a task would build (task digest + sha256 in its sidecar); the rest removes what a failed
or older run left. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import errno
import json
from typing import Any

import pyarrow.fs as pafs

from packer import schema
from packer.build.layout import task_digest
from packer.build.outlock import LOCK_NAME, OutLock
from packer.config import PackConfig
from packer.errors import NavitError

STATE_DIR = ".navit-pack"


STATE_FILE = f"{STATE_DIR}/state.json"
LOCK_FILE = f"{STATE_DIR}/{LOCK_NAME}"


def sidecar_name(shard: int) -> str:
    return f"{STATE_DIR}/shard-{shard:06d}.json"


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
    """:func:`open_out_dir` without keeping the lock (for callers that only prepare)."""
    fs, base, lock = open_out_dir(out, cfg, source, resume)
    if lock is not None:
        lock.release()
    return fs, base


def open_out_dir(
    out: str, cfg: PackConfig, source: str, resume: bool
) -> tuple[pafs.FileSystem, str, OutLock | None]:
    """Check OUT may be written (empty, or a pack of the same config and source), lock it (local
    disk: :mod:`packer.build.outlock`) and mark it as ours. The caller releases the lock.

    Raises NavitError (one line) otherwise — before writing anything when another run holds the
    lock or OUT is refused. Removes index.json so that its presence keeps meaning 'complete', and
    leftover temp files of a killed run."""
    fs, base = schema.resolve_fs(out)
    state_dir = schema.join(base, STATE_DIR)
    lock = OutLock.take(fs, state_dir, out, create=False)  # a run in progress: refused first
    try:
        _check_out_dir(fs, base, out, cfg, source, resume)
        if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders (and no markers)
            fs.create_dir(state_dir, recursive=True)
        if lock is None:
            lock = OutLock.take(fs, state_dir, out, create=True)
            _check_out_dir(fs, base, out, cfg, source, resume)  # again, now that no one else writes
        _mark_ours(fs, base, cfg, source)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return fs, base, lock


def _check_out_dir(
    fs: pafs.FileSystem, base: str, out: str, cfg: PackConfig, source: str, resume: bool
) -> None:
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


def _mark_ours(fs: pafs.FileSystem, base: str, cfg: PackConfig, source: str) -> None:
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


def out_error(out: str, e: OSError) -> NavitError:
    """The one-line error for an --out that cannot be written (the OS's reason, without pyarrow's
    'Detail:' text)."""
    import os

    if "://" in out and not e.errno:
        from packer.storage import describe_store_error

        return NavitError(f"--out {out}: cannot write the pack there ({describe_store_error(out, e)})")
    why = os.strerror(e.errno) if e.errno else (str(e).strip().splitlines() or [type(e).__name__])[0]
    return NavitError(f"--out {out}: cannot write the pack there ({why})")


class OutWriteError(OSError):
    """Writing a file of the pack failed (disk full, quota, the object store unreachable, ...):
    raised by the driver and for a shard task that reported a failed write."""


def as_write_error(errno_: int | None, message: str) -> OutWriteError:
    return OutWriteError(errno_, message) if errno_ else OutWriteError(message)


def write_error(out: str, e: OSError) -> NavitError:
    """The one-line error for a write into --out that failed part-way (``--resume`` continues)."""
    import os

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return NavitError(f"--out {out}: {what} (free some space, then run the same command with --resume)")
    if "://" in out:
        from packer.storage import describe_store_error

        why = describe_store_error(out, e)
        return NavitError(f"--out {out}: {why} (run the same command with --resume once it answers)")
    why = os.strerror(e.errno) if e.errno else _first_line(e)
    return NavitError(f"--out {out}: writing the pack failed ({why}); --resume continues it")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _remove_temp_files(fs: pafs.FileSystem, base: str) -> None:
    """Best effort after a failed run: delete the temp files of writes that did not finish (a full
    disk must not stay full of them)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return  # object stores: an upload that did not finish leaves no object
    try:
        for entry in _list(fs, base, recursive=True):
            if ".tmp-" in entry.base_name and entry.type == pafs.FileType.File:
                with contextlib.suppress(OSError):
                    fs.delete_file(entry.path)
    except NavitError:
        pass


def _holds_no_shard(fs: pafs.FileSystem, base: str) -> bool:
    """True when OUT holds no file but our state file (and temp files): no shard, sidecar, index."""
    for entry in _list(fs, base, recursive=True):
        if entry.type != pafs.FileType.File or ".tmp-" in entry.base_name:
            continue
        if entry.path.rstrip("/") not in (schema.join(base, STATE_FILE), schema.join(base, LOCK_FILE)):
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
