"""Images stored inside containers: a member of a tar shard (WebDataset) or a row of a Parquet file.

A listing gives each such image a *locator* in place of a file path; the locator travels through the
plan, the shard tasks and ``images.parquet`` like a path does, and names everything needed to read
the image again without listing the container:

* ``tar:OFFSET:SIZE:SHARD::MEMBER`` — the member's data starts at byte OFFSET of SHARD (a local path
  or a URI) and is SIZE bytes long (stdlib ``tarfile`` gives both while listing). Reading it is one
  ranged read of those bytes: the shard is never extracted.
* ``parquet:ROW_GROUP:INDEX:ROW:FILE::COLUMN`` — row ROW of FILE (row INDEX of row group ROW_GROUP),
  image column COLUMN (binary, or a struct{bytes, path} as Hugging Face image datasets store it;
  null bytes fall back to reading ``path``, relative to FILE's folder). Parquet cannot read one row
  without decoding its row group's column chunk, so readers here group rows by row group and read
  each row group's image column once (:class:`RowGroupCache`, :func:`read_many`); a whole file is
  never loaded.

The header scan (plan stage) and the decoder (build stage) both read through here, so they see the
same bytes and reject with the same words. No Ray, no torch.
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from packer.localfile import open_regular

TAR = "tar:"
PARQUET = "parquet:"
_SEP = "::"


class MemberError(Exception):
    """A member or row that cannot be read; ``reason`` is one user-readable line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TarMember:
    shard: str
    member: str
    offset: int
    size: int


@dataclass(frozen=True)
class ParquetRow:
    file: str
    column: str
    row_group: int
    index: int  # row inside the row group
    row: int  # row inside the file


def tar_locator(shard: str, member: str, offset: int, size: int) -> str:
    return f"{TAR}{offset}:{size}:{shard}{_SEP}{member}"


def parquet_locator(file: str, column: str, row_group: int, index: int, row: int) -> str:
    return f"{PARQUET}{row_group}:{index}:{row}:{file}{_SEP}{column}"


def is_locator(path: str) -> bool:
    """True for a member/row locator. Listed local paths are absolute and URIs have ``scheme://``,
    so neither can start with ``tar:`` / ``parquet:`` followed by digits."""
    return parse(path) is not None


def parse(path: str) -> TarMember | ParquetRow | None:
    if path.startswith(TAR):
        head, _, rest = path[len(TAR) :].partition(":")
        size, _, rest = rest.partition(":")
        container, sep, member = rest.partition(_SEP)
        if head.isdigit() and size.isdigit() and sep:
            return TarMember(container, member, int(head), int(size))
    elif path.startswith(PARQUET):
        parts = path[len(PARQUET) :].split(":", 3)
        if len(parts) == 4 and all(p.isdigit() for p in parts[:3]):
            container, sep, column = parts[3].rpartition(_SEP)
            if sep:
                return ParquetRow(container, column, int(parts[0]), int(parts[1]), int(parts[2]))
    return None


def describe(path: str) -> str:
    """Where an image lives, for humans: ``SHARD#MEMBER`` / ``FILE#row=N``; a plain path unchanged."""
    loc = parse(path)
    if isinstance(loc, TarMember):
        return f"{loc.shard}#{loc.member}"
    if isinstance(loc, ParquetRow):
        return f"{loc.file}#row={loc.row}"
    return path


# ----------------------------------------------------------------------------------------------------
# Opening containers (local or object storage)
# ----------------------------------------------------------------------------------------------------


def open_random_access(location: str) -> Any:
    """A seekable binary file for a local path or a URI (pyarrow.fs for object storage)."""
    if "://" in location and not location.startswith("file://"):
        from packer.storage import object_filesystem

        fs, inner = object_filesystem(location)
        return fs.open_input_file(inner)
    return open_regular(location[len("file://") :] if location.startswith("file://") else location)


def _read_at(f: Any, offset: int, size: int) -> bytes:
    if hasattr(f, "read_at"):  # pyarrow NativeFile: one ranged request
        data = f.read_at(size, offset)
        return data if isinstance(data, bytes) else data.to_pybytes()
    f.seek(offset)
    return f.read(size)


class _Window(io.RawIOBase):
    """Bytes [offset, offset + size) of an open file, as a file of its own (seekable, read-only):
    Pillow reads just the header it needs from it."""

    def __init__(self, base: Any, offset: int, size: int) -> None:
        self._base, self._offset, self._size, self._pos = base, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self._size - self._pos))
        if n == 0:
            return 0
        data = _read_at(self._base, self._offset + self._pos, n)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._base.close()
        super().close()


def _container_reason(e: OSError, what: str) -> str:
    from packer.imagefile import unreadable_reason

    return unreadable_reason(e).replace("unreadable path", f"unreadable {what}", 1)


def open_tar_member(loc: TarMember) -> io.BufferedReader:
    """The member's bytes as a seekable file (only they are read). MemberError if the shard is gone
    or shorter than the member."""
    try:
        base = open_random_access(loc.shard)
        total = base.size() if hasattr(base, "size") else os.fstat(base.fileno()).st_size
    except OSError as e:
        raise MemberError(_container_reason(e, "tar shard")) from None
    if loc.offset + loc.size > total:
        base.close()
        raise MemberError(f"truncated tar member: {max(0, total - loc.offset)} of {loc.size} bytes")
    remote = hasattr(base, "read_at")
    return io.BufferedReader(_Window(base, loc.offset, loc.size), 65536 if remote else 8192)


# ----------------------------------------------------------------------------------------------------
# Parquet rows, read by row group
# ----------------------------------------------------------------------------------------------------


def resolve_relative(container: str, path: str) -> str:
    """A path found inside a container, relative to the container's folder (URIs kept as they are)."""
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in container:
        return container.rsplit("/", 1)[0] + "/" + posixpath.normpath(path)
    return os.path.normpath(os.path.join(os.path.dirname(container), path))


def _row_group_values(file: str, column: str, row_group: int) -> list[Any]:
    """One row group's image column as Python values (bytes, or dicts for a struct column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_random_access(file) as f:
            table = pq.ParquetFile(f).read_row_group(row_group, columns=[column])
    except OSError as e:
        if isinstance(e, FileNotFoundError | PermissionError):
            raise MemberError(_container_reason(e, "parquet file")) from None
        raise MemberError(f"corrupt parquet row group {row_group}: {str(e).splitlines()[0]}") from None
    except (pa.ArrowException, ValueError) as e:
        raise MemberError(f"corrupt parquet row group {row_group}: {str(e).splitlines()[0]}") from None
    return table.column(0).to_pylist()


def _row_bytes(loc: ParquetRow, value: Any) -> bytes:
    """The image bytes of one row: the binary value, or the struct's ``bytes``; null bytes fall back
    to the struct's ``path``."""
    path = None
    if isinstance(value, dict):
        path = value.get("path")
        value = value.get("bytes")
    if value is not None:
        return bytes(value)
    if not path:
        raise MemberError("null image bytes and no path")
    target = resolve_relative(loc.file, str(path))
    try:
        with open_random_access(target) as f:
            return _read_at(f, 0, f.size()) if hasattr(f, "read_at") else f.read()
    except OSError as e:
        from packer.imagefile import unreadable_reason

        raise MemberError(f"null image bytes; path {path!r}: {unreadable_reason(e)}") from None


class RowGroupCache:
    """Keeps the last row group read, so rows visited in (file, row group) order cost one read of
    each row group's image column; memory is one row group's image bytes."""

    def __init__(self) -> None:
        self._key: tuple[str, str, int] | None = None
        self._values: list[Any] | MemberError = []

    def read(self, loc: ParquetRow) -> bytes:
        key = (loc.file, loc.column, loc.row_group)
        if key != self._key:
            self._key = key
            try:
                self._values = _row_group_values(*key)
            except MemberError as e:
                self._values = e
        if isinstance(self._values, MemberError):
            raise self._values
        if loc.index >= len(self._values):
            raise MemberError(f"parquet row {loc.row} not found (row group {loc.row_group} is shorter)")
        return _row_bytes(loc, self._values[loc.index])


def order_key(path: str) -> tuple[str, int, int]:
    """Sort key putting reads of the same container together, in file order."""
    loc = parse(path)
    if isinstance(loc, TarMember):
        return (loc.shard, loc.offset, 0)
    if isinstance(loc, ParquetRow):
        return (loc.file, loc.row_group, loc.index)
    return (path, 0, 0)


def read_bytes(path: str, cache: RowGroupCache | None = None) -> bytes:
    """The bytes of a tar member or Parquet row. MemberError with the reason otherwise."""
    loc = parse(path)
    if isinstance(loc, TarMember):
        with open_tar_member(loc) as f:
            return f.read()
    if isinstance(loc, ParquetRow):
        return (cache or RowGroupCache()).read(loc)
    raise MemberError(f"not a member locator: {path}")


def open_stream(path: str, cache: RowGroupCache | None = None) -> Any:
    """A seekable binary file over a member (tar: only its bytes are read, lazily)."""
    loc = parse(path)
    if isinstance(loc, TarMember):
        return open_tar_member(loc)
    return io.BytesIO(read_bytes(path, cache))


def read_many(paths: Iterable[str]) -> dict[str, bytes | MemberError]:
    """Bytes of the Parquet rows among ``paths`` (others are skipped: read them one by one), each row
    group read once. For a shard task: its images come from anywhere in the set (the packing order
    is shuffled), so reading row by row would decode a row group per image."""
    rows = sorted({p for p in paths if isinstance(parse(p), ParquetRow)}, key=order_key)
    cache = RowGroupCache()
    out: dict[str, bytes | MemberError] = {}
    for p in rows:
        loc = parse(p)
        assert isinstance(loc, ParquetRow)
        try:
            out[p] = cache.read(loc)
        except MemberError as e:
            out[p] = e
    return out
