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

import contextlib
import errno
import json
import os
import socket
import time

import pyarrow.fs as pafs

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
        that a directory navit is about to refuse is not written into. Not local disk: None."""
        if not isinstance(fs, pafs.LocalFileSystem):
            return None
        import fcntl

        path = os.path.join(state_dir, LOCK_NAME)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise NavitError(
                        f"--out {out}: another navit pack is writing there ({holder}); "
                        "wait for it to finish, or use another --out"
                    ) from None
                raise
            # The file may have been removed (a failed run cleaning up) between open and flock:
            # then this lock guards nothing, so take the lock again on the file now at ``path``.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            if not create:
                return None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": int(time.time())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record, sort_keys=True) + "\n").encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (closing the descriptor). A run that opened
        the file just before it went sees, once it holds the lock, that the path is gone and
        locks a new file instead (see :meth:`take`)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def _read_holder(fd: int) -> str:
    try:
        rec = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(rec["since"])))
        return f"pid {int(rec['pid'])} on {rec['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"
