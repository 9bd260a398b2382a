"""Opening a local input file for reading — only if it is a regular file.

``open()`` on a named pipe blocks until a writer appears (forever, for a FIFO nobody writes), and a
device or socket is no image either. So the header scan and the decoder open local inputs through
:func:`open_regular`: ``stat`` first (following symlinks, so a symlink to a regular file is fine),
refuse anything that is not a regular file, then open non-blocking and check the opened descriptor
again (the path could have been swapped in between). Nothing here imports Ray.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

_KINDS = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


class NotRegularFile(OSError):
    """An input path that exists but is not a regular file (FIFO, socket, device)."""


def file_kind(mode: int) -> str:
    """A short name for what a ``st_mode`` is ('regular file', 'named pipe (FIFO)', ...)."""
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "special file"


def _check(mode: int, path: str) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(mode):
        raise NotRegularFile(errno.EINVAL, f"not a regular file: {file_kind(mode)}", path)


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (or a symlink to one).

    Raises the usual OSError subclasses (FileNotFoundError, PermissionError, IsADirectoryError) and
    :class:`NotRegularFile` otherwise; never blocks on a FIFO."""
    _check(os.stat(path).st_mode, path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        _check(os.fstat(fd).st_mode, path)
        os.set_blocking(fd, True)  # a regular file: plain blocking reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
