"""A lock on an output directory on local disk, so that two navit processes never write into one folder.

``with DirLock(path, flag="--out", what="navit train"):`` takes an exclusive, non-blocking ``flock``
on ``PATH/.navit-lock`` and records its holder there (pid, host, command, start time). A second
process is refused at once with one line naming the holder (:class:`DirLockedError`, a NavitError).

Stale locks: the kernel drops a flock when the process holding it ends, however it ends (kill -9,
an OOM kill, a crash), so a lock file left behind by a dead process is not locked and the next run
takes it over; nothing needs to be cleaned by hand. The lock file is removed on release; a run that
created the folder and wrote nothing into it removes the folder too, so a refused or failed start
leaves nothing behind.

Scope: local filesystems (flock is exact there). On NFS, Linux maps flock onto NFS byte-range locks
(NFSv4: held by a lease the server drops when the client dies), which works but depends on the
server; object storage (s3://, gs://) has no such lock and is not handled here. Re-entrant within
one process (the CLI takes the lock before verifying data, the trainer takes it again).

Root module: no Ray, no packer stage, no torch (usable by packer stages and by trainer/)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from packer.errors import NavitError

LOCK_NAME = ".navit-lock"

_held: dict[str, tuple[DirLock, int]] = {}  # realpath → (the lock object, nesting depth)
_held_mu = threading.Lock()


class DirLockedError(NavitError):
    """The directory is locked by another process (the message names it)."""


def holder_info(directory: str | Path) -> dict[str, Any] | None:
    """What the lock file of ``directory`` says about its holder (None: no file or unreadable)."""
    try:
        data = json.loads((Path(directory) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process"
    cmd = info.get("what") or "a navit process"
    return f"{cmd} (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')})"


class LockHeld(Exception):
    """:func:`flock_file`: another open file description holds the lock. ``holder`` is the record
    its holder wrote into the file (None if unreadable); ``changing``: the file kept being replaced."""

    def __init__(self, holder: dict[str, Any] | None, changing: bool = False) -> None:
        super().__init__("locked by another process")
        self.holder, self.changing = holder, changing


class LockFailed(Exception):
    """:func:`flock_file`: the filesystem refused the flock itself (``error``), e.g. no lock support."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def flock_file(path: str | Path, *, create: bool = True) -> int | None:
    """Open ``path`` and take an exclusive ``flock`` on it without waiting; the returned descriptor
    holds the lock until it is closed (see :func:`unlock_file`).

    ``create=False`` locks only a file that already exists (None when there is none). Raises
    LockHeld when another process holds it, LockFailed when the flock is refused, and the OSError of
    ``open`` otherwise. Shared by :class:`DirLock` (a run folder) and packer.build.outlock (a pack)."""
    for _ in range(10):  # retried only when a holder removed the file between open and lock
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if create:
                raise
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_record(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(holder) from None
            raise LockFailed(e) from None
        # The holder we waited on may have unlinked the file after we opened it: then we hold a
        # lock on a file nobody else can see, so start again with the file now at ``path``.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
        if not create:
            return None
    raise LockHeld(None, changing=True)


def write_record(fd: int, record: dict[str, Any], **dumps: Any) -> None:
    """Replace the lock file's content with ``record`` (one JSON line). Informational only (the
    flock is the lock): a full disk may refuse it, which is fine."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record, **dumps) + "\n").encode(), 0)


def unlock_file(fd: int, path: str | Path) -> None:
    """Remove the lock file while still holding it, then drop the lock by closing ``fd``: a process
    that opened the old file re-checks the inode after locking and starts again (flock_file)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class DirLock:
    """Exclusive lock on a directory; see the module docstring. ``flag`` names the option the
    directory came from (for messages), ``what`` the command holding it."""

    def __init__(self, directory: str | Path, *, flag: str = "--out", what: str | None = None) -> None:
        self.directory = Path(directory)
        self.flag = flag
        self.what = what or "a navit process"
        self._fd: int | None = None
        self._created_dir = False
        self._key = ""

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the lock ----------------------------------------------------------------------------------
    def acquire(self) -> None:
        d = self.directory
        try:
            if not d.exists():
                d.mkdir(parents=True)
                self._created_dir = True
        except OSError as e:
            raise NavitError(f"{self.flag} {d}: cannot create the folder ({_why(e)})") from None
        self._key = os.path.realpath(d)
        with _held_mu:
            if self._key in _held:  # this process holds it already: nest
                outer, depth = _held[self._key]
                _held[self._key] = (outer, depth + 1)
                self._fd = -1
                return
        try:
            fd = flock_file(d / LOCK_NAME)
        except LockHeld as e:
            if e.changing:
                raise DirLockedError(
                    f"{self.flag} {d}: its lock file keeps changing; another process uses it"
                ) from None
            raise DirLockedError(
                f"{self.flag} {d}: in use by {_describe(e.holder)}; wait for it to finish, "
                "stop it, or use another folder"
            ) from None
        except LockFailed as e:
            self._undo_dir()
            raise NavitError(
                f"{self.flag} {d}: cannot lock it ({_why(e.error)}; locks need a local filesystem)"
            ) from None
        except OSError as e:
            self._undo_dir()
            raise NavitError(f"{self.flag} {d}: cannot create its lock file ({_why(e)})") from None
        assert fd is not None  # created when missing
        self._fd = fd
        self._write_holder(fd)
        with _held_mu:
            _held[self._key] = (self, 1)

    def _write_holder(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "what": self.what,
            "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        write_record(fd, info)

    def release(self) -> None:
        if self._fd is None:
            return
        with _held_mu:
            outer, depth = _held.get(self._key, (self, 1))
            if depth > 1:
                _held[self._key] = (outer, depth - 1)
                self._fd = None
                return
            _held.pop(self._key, None)
        fd, self._fd = self._fd, None
        if fd >= 0:
            unlock_file(fd, self.directory / LOCK_NAME)
            self._undo_dir()

    def _undo_dir(self) -> None:
        """Remove the folder again when this lock created it and nothing was written into it."""
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only succeeds when empty
            self._created_dir = False


def _why(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)
