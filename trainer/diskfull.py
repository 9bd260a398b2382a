"""Telling a full disk apart from other failures, whatever library raised it.

A full disk reaches the trainer in several disguises: a plain ``OSError(ENOSPC)`` from Python's own
writes, torch's ``RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos ...`` (with the
OSError as its ``__context__`` when torch wrote through a Python file object), safetensors'
``SafetensorError(... No space left on device (os error 28))``. :func:`os_errno` finds the errno in
any of them; :func:`is_disk_full` says whether it is ENOSPC or EDQUOT (quota exceeded).
"""

from __future__ import annotations

import errno
import re

from packer.errors import NavitError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class DiskFullError(NavitError):
    """No space left on the device that holds ``--out`` (the message names it and what was kept)."""


def os_errno(exc: BaseException) -> int | None:
    """The errno behind ``exc``: its own, its cause's or context's, or one a Rust library (safetensors)
    put in its message as ``(os error N)``. None when there is none."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = _RUST_OS_ERROR.search(str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def is_disk_full(exc: BaseException) -> bool:
    return os_errno(exc) in DISK_FULL
