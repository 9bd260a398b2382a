"""One writer per pack directory: the lock `navit pack` holds on ``--out`` while it writes.

Local disk (and NFS, where Linux maps ``flock`` onto NFS byte-range locks): an exclusive
``flock`` on ``OUT/.navit-pack/lock``, taken without waiting. The file records the holder's pid,
host and start time so that a refused run can say who holds it; it is removed when the run ends.
The kernel drops the lock when its process ends, however it ends (crash, ``kill -9``), so there is
no stale lock to clean up: a lock file left by a killed run is simply taken over.

Object stores (``s3://``, ``gs://``) have no locks, and pyarrow exposes no conditional write
(``If-None-Match``) to build one from; nothing is taken there (see docs/pack.md, "Concurrent
writers").
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pyarrow.fs as pafs

from packer.dirlock import LockFailed, LockHeld, flock_file, unlock_file, write_record
from packer.errors import NavitError

LOCK_NAME = "lock"


class OutLock:
    """An exclusive lock on a local pack directory's state folder; :meth:`release` frees it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def take(cls, fs: pafs.FileSystem, state_dir: str, out: str, create: bool) -> OutLock | None:
        """Lock ``state_dir/lock``, or raise NavitError (one line) naming the run that holds it.

        ``create=False`` only locks a lock file that already exists (None when there is none), so
        that a directory navit is about to refuse is not written into. Not local disk: None.
        Not re-entrant: a second take in the same process is refused like another process's."""
        if not isinstance(fs, pafs.LocalFileSystem):
            return None
        path = os.path.join(state_dir, LOCK_NAME)
        try:
            fd = flock_file(path, create=create)
        except LockHeld as e:
            raise NavitError(
                f"--out {out}: another navit pack is writing there ({_describe(e.holder)}); "
                "wait for it to finish, or use another --out"
            ) from None
        except LockFailed as e:
            raise e.error from None
        if fd is None:
            return None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": int(time.time())}
        write_record(fd, record, sort_keys=True)
        return cls(fd, path)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (closing the descriptor). A run that opened
        the file just before it went sees, once it holds the lock, that the path is gone and
        locks a new file instead (packer.dirlock.flock_file)."""
        if self.fd >= 0:
            unlock_file(self.fd, self.path)
            self.fd = -1


def _describe(rec: dict[str, Any] | None) -> str:
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(rec["since"])))
        return f"pid {int(rec['pid'])} on {rec['host']}, since {since}"
    except (ValueError, KeyError, TypeError):  # no record yet (None), or a partial one
        return "its pid is not recorded yet"
