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
  each row group's image column once (:class:`ContainerCache`, :func:`read_many`); a whole file is
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


class _Shard:
    """An open tar shard and its size (one HEAD request on object storage, done once)."""

    def __init__(self, location: str) -> None:
        try:
            self.file = open_random_access(location)
            f = self.file
            self.size = f.size() if hasattr(f, "read_at") else os.fstat(f.fileno()).st_size
        except OSError as e:
            raise MemberError(_container_reason(e, "tar shard")) from None
        self.remote = hasattr(self.file, "read_at")

    def check(self, loc: TarMember) -> None:
        if loc.offset + loc.size > self.size:
            raise MemberError(f"truncated tar member: {max(0, self.size - loc.offset)} of {loc.size} bytes")

    def read(self, loc: TarMember) -> bytes:
        self.check(loc)
        try:
            return _read_at(self.file, loc.offset, loc.size)
        except OSError as e:
            raise MemberError(_container_reason(e, "tar shard")) from None

    def close(self) -> None:
        self.file.close()


class _Unclosed(_Window):
    """A window whose close leaves the shard open (the cache owns it)."""

    def close(self) -> None:
        io.RawIOBase.close(self)


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


class ContainerCache:
    """The last tar shard opened and the last Parquet row group read. Visiting members in container
    order (:func:`order_key`) then opens each shard once and reads each row group's image column
    once; memory is one row group's image bytes. Close it when done (or use ``with``)."""

    def __init__(self) -> None:
        self._shard: _Shard | None = None
        self._shard_key: str | None = None
        self._key: tuple[str, str, int] | None = None
        self._values: list[Any] | MemberError = []

    def __enter__(self) -> ContainerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._shard, self._shard_key = None, None

    def shard(self, loc: TarMember) -> _Shard:
        if self._shard_key != loc.shard:
            self.close()
            self._shard_key = loc.shard
            self._shard = _Shard(loc.shard)
        assert self._shard is not None
        return self._shard

    def open_member(self, loc: TarMember) -> io.BufferedReader:
        """The member's bytes as a seekable file; only what is read of it is fetched."""
        shard = self.shard(loc)
        shard.check(loc)
        window = _Unclosed(shard.file, loc.offset, loc.size)
        return io.BufferedReader(window, 65536 if shard.remote else 8192)

    def read_row(self, loc: ParquetRow) -> bytes:
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

    def read(self, path: str) -> bytes:
        loc = parse(path)
        if isinstance(loc, TarMember):
            shard = self.shard(loc)
            return shard.read(loc)
        if isinstance(loc, ParquetRow):
            return self.read_row(loc)
        raise MemberError(f"not a member locator: {path}")


def order_key(path: str) -> tuple[str, int, int]:
    """Sort key putting reads of the same container together, in file order."""
    loc = parse(path)
    if isinstance(loc, TarMember):
        return (loc.shard, loc.offset, 0)
    if isinstance(loc, ParquetRow):
        return (loc.file, loc.row_group, loc.index)
    return (path, 0, 0)


def read_bytes(path: str, cache: ContainerCache | None = None) -> bytes:
    """The bytes of a tar member or Parquet row. MemberError with the reason otherwise."""
    if cache is not None:
        return cache.read(path)
    with ContainerCache() as own:
        return own.read(path)


def open_stream(path: str, cache: ContainerCache) -> Any:
    """A seekable binary file over a member (tar: only the bytes read are fetched)."""
    loc = parse(path)
    if isinstance(loc, TarMember):
        return cache.open_member(loc)
    return io.BytesIO(cache.read(path))


# Ranged reads of one shard's members are merged when the hole between them is at most this, up to
# this much per request: object stores charge per request and answer in tens of ms, so a few large
# reads beat many small ones (the same trade-off as pyarrow's read coalescing).
_HOLE = 1 << 20
_SPAN = 16 << 20


def _coalesced(shard: _Shard, locs: list[tuple[str, TarMember]], out: dict[str, bytes | MemberError]) -> None:
    """Read ``locs`` (one shard, by offset) in merged spans."""
    i = 0
    while i < len(locs):
        j, start = i, locs[i][1].offset
        end = start + locs[i][1].size
        while (
            j + 1 < len(locs)
            and locs[j + 1][1].offset - end <= _HOLE
            and locs[j + 1][1].offset + locs[j + 1][1].size - start <= _SPAN
        ):
            j += 1
            end = max(end, locs[j][1].offset + locs[j][1].size)
        try:
            blob = _read_at(shard.file, start, min(end, shard.size) - start)
        except OSError as e:
            blob = MemberError(_container_reason(e, "tar shard"))
        for path, loc in locs[i : j + 1]:
            try:
                shard.check(loc)
                if isinstance(blob, MemberError):
                    raise blob
                out[path] = blob[loc.offset - start : loc.offset - start + loc.size]
            except MemberError as e:
                out[path] = e
        i = j + 1


def read_many(paths: Iterable[str]) -> dict[str, bytes | MemberError]:
    """Bytes of the tar members and Parquet rows among ``paths`` (plain paths are left out: read
    them one by one), in container order: each shard opened once, each row group read once, and the
    members of a shard on object storage fetched in merged ranged reads. For a shard task, whose
    images come from anywhere in the set (the packing order is shuffled): reading row by row would
    decode a row group per image, and cost a request per member."""
    wanted = sorted({p for p in paths if parse(p) is not None}, key=order_key)
    out: dict[str, bytes | MemberError] = {}
    with ContainerCache() as cache:
        k = 0
        while k < len(wanted):
            loc = parse(wanted[k])
            if isinstance(loc, TarMember):
                group = [(wanted[k], loc)]
                while k + len(group) < len(wanted):
                    nxt = parse(wanted[k + len(group)])
                    if not (isinstance(nxt, TarMember) and nxt.shard == loc.shard):
                        break
                    group.append((wanted[k + len(group)], nxt))
                try:
                    shard = cache.shard(loc)
                except MemberError as e:
                    out.update({p: e for p, _ in group})
                else:
                    if shard.remote:
                        _coalesced(shard, group, out)
                    else:
                        for p, m in group:
                            try:
                                out[p] = shard.read(m)
                            except MemberError as e:
                                out[p] = e
                k += len(group)
                continue
            try:
                out[wanted[k]] = cache.read(wanted[k])
            except MemberError as e:
                out[wanted[k]] = e
            k += 1
    return out


def is_remote(path: str) -> bool:
    """A member or row of a container on object storage (not a local file)."""
    loc = parse(path)
    where = loc.shard if isinstance(loc, TarMember) else loc.file if isinstance(loc, ParquetRow) else ""
    return "://" in where and not where.startswith("file://")
