"""Header scan: native width, height (after EXIF orientation) and format of every input, no pixel decoded.

``PIL.Image.open`` only parses the header; the EXIF orientation is read from the raw EXIF block the
header parser already holds (``img.info['exif']``, or the TIFF tag), never through ``getexif()``,
which for a PNG whose EXIF follows the pixel data would decode the whole image. Orientations 5-8 swap
width and height. Rejection reasons use the same words as :mod:`packer.build.decode`, so a plan's and a
pack's rejection counts line up.

Two entry points with identical results: :func:`scan_headers_local` (a plain loop; tests, tiny
inputs, re-checks) and :func:`scan_headers` (Ray Data ``map_batches`` over the file list, joining a
cluster or starting embedded Ray; results sorted by image_id, so worker count does not matter).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from packer import members
from packer.imagefile import (
    EXIF_ORIENTATION,
    ImageHeaderError,
    one_line,
    open_image_header,
    unreadable_reason,
    unsupported_format,
)
from packer.localfile import open_regular

# Below this many files, starting embedded Ray (5-30 s) costs more than a local loop: measured ~0.4 ms
# per local file (page cache warm); object-store reads cost a round trip each (tens of ms), so URIs go
# through Ray sooner.
RAY_MIN_LOCAL_FILES = 50_000
RAY_MIN_REMOTE_FILES = 1_000
_BATCH = 256  # files per Ray Data batch
_PREFETCH = 64  # remote tar members fetched together (memory: 64 members' bytes)


class HeaderError(Exception):
    """A header that cannot be read; ``reason`` is one user-readable line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Headers:
    """Per-input header fields, parallel arrays in image_id order. ``reason[i] != ''`` = rejected."""

    image_id: np.ndarray  # int64 (n,)
    width: np.ndarray  # int32 (n,), after EXIF orientation; -1 when rejected
    height: np.ndarray  # int32 (n,)
    orientation: np.ndarray  # int8 (n,), EXIF orientation 1..8 (1 when absent)
    format: list[str]  # Pillow format name ('JPEG', 'PNG', 'WEBP', ...), '' when rejected
    reason: list[str]  # '' = ok

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def ok(self) -> np.ndarray:
        return np.array([not r for r in self.reason], dtype=bool)


def _open_stream(path: str | bytes, cache: members.ContainerCache | None = None) -> Any:
    if isinstance(path, bytes):  # a member's bytes, already fetched
        return io.BytesIO(path)
    if members.is_locator(path):  # a tar member (only its bytes are read) or a Parquet row
        return members.open_stream(path, cache or members.ContainerCache())
    if "://" in path and not path.startswith("file://"):
        from packer.storage import object_filesystem

        fs, inner = object_filesystem(path)
        return fs.open_input_file(inner)  # random access: Pillow seeks within the header
    # Only regular files: open() on a FIFO would block until a writer appears.
    return open_regular(path[len("file://") :] if path.startswith("file://") else path)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1-8) from the header's raw EXIF block; 1 when absent or unreadable."""
    try:
        if img.format == "TIFF":
            o = img.tag_v2.get(EXIF_ORIENTATION, 1)  # type: ignore[attr-defined]
        else:
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            o = exif.get(EXIF_ORIENTATION, 1)
        o = int(o)
    except Exception:  # a malformed EXIF block must not reject an otherwise good image
        return 1
    return o if 1 <= o <= 8 else 1


def read_header(
    path: str | bytes, max_pixels: int, cache: members.ContainerCache | None = None
) -> tuple[int, int, int, str]:
    """(width, height, orientation, format) of one file, width/height as displayed (after EXIF
    orientation). Raises HeaderError with the reason. Reads only the header bytes (a Parquet row:
    its row group's image column, through ``cache``)."""
    try:
        f = _open_stream(path, cache)
    except OSError as e:
        raise HeaderError(unreadable_reason(e)) from None
    except members.MemberError as e:
        raise HeaderError(e.reason) from None
    with f:
        try:
            head = f.read(16)
            f.seek(0)
        except OSError as e:
            raise HeaderError(f"unreadable path: {one_line(e)}") from None
        if not head:
            raise HeaderError("zero-byte file")
        missing = unsupported_format(head)
        if missing:
            raise HeaderError(missing)
        try:
            img = open_image_header(f, max_pixels)
        except ImageHeaderError as e:
            raise HeaderError(e.reason) from None
        w, h = img.size
        fmt = img.format or ""
        orientation = _orientation(img)
    if w <= 0 or h <= 0:
        raise HeaderError(f"corrupt image header: size {w}x{h}")
    if w * h > max_pixels:
        raise HeaderError(f"decompression bomb: {w}x{h} = {w * h} pixels > decode.max_pixels ({max_pixels})")
    if orientation >= 5:
        w, h = h, w
    return w, h, orientation, fmt


def _scan_rows(image_ids: np.ndarray, paths: Sequence[str], max_pixels: int) -> dict[str, Any]:
    n = len(paths)
    out: dict[str, Any] = {
        "image_id": np.asarray(image_ids, dtype=np.int64),
        "width": np.full(n, -1, np.int32),
        "height": np.full(n, -1, np.int32),
        "orientation": np.ones(n, np.int8),
        "format": [""] * n,
        "reason": [""] * n,
    }
    # Container reads in file order (tar offsets, Parquet row groups): each shard opened once, each
    # row group read once; members of remote tar shards fetched PREFETCH at a time in merged ranged
    # reads (a request per member costs more than the bytes).
    order = sorted(range(n), key=lambda j: members.order_key(paths[j]))
    prefetched: dict[str, Any] = {}
    with members.ContainerCache() as cache:
        for k, i in enumerate(order):
            if k % _PREFETCH == 0:
                chunk = [paths[j] for j in order[k : k + _PREFETCH]]
                remote_tar = [p for p in chunk if p.startswith(members.TAR) and members.is_remote(p)]
                prefetched = members.read_many(remote_tar)
            try:
                got = prefetched.get(paths[i])
                if isinstance(got, members.MemberError):
                    raise HeaderError(got.reason)
                w, h, o, fmt = read_header(paths[i] if got is None else got, max_pixels, cache)
            except HeaderError as e:
                out["reason"][i] = e.reason
                continue
            except Exception as e:  # never lose an image to an unexpected decoder error: record it
                out["reason"][i] = f"corrupt image header: {type(e).__name__}: {one_line(e)}"
                continue
            out["width"][i], out["height"][i], out["orientation"][i], out["format"][i] = w, h, o, fmt
    return out


def scan_headers_local(
    image_ids: Sequence[int] | np.ndarray, paths: Sequence[str], max_pixels: int
) -> Headers:
    """Read every header in this process, in order."""
    return Headers(**_scan_rows(np.asarray(image_ids, np.int64), list(paths), max_pixels))


def _header_udf(batch: dict[str, np.ndarray], max_pixels: int) -> dict[str, np.ndarray]:
    paths = [bytes(p).decode("utf-8", "surrogateescape") for p in batch["path"]]  # see scan_headers
    out = _scan_rows(batch["image_id"], paths, max_pixels)
    out["format"] = np.array(out["format"], dtype=object)
    out["reason"] = np.array(out["reason"], dtype=object)
    return out


def scan_headers(
    image_ids: Sequence[int] | np.ndarray,
    paths: Sequence[str],
    max_pixels: int,
    *,
    ray_address: str | None = None,
    workers: int | None = None,
    use_ray: bool | None = None,
) -> Headers:
    """Read every header, through Ray Data when ``use_ray`` (default: a Ray address was given, or
    there are at least RAY_MIN_LOCAL_FILES local files / RAY_MIN_REMOTE_FILES URIs). ``workers``
    caps the CPUs (embedded Ray) and the concurrent tasks."""
    ids = np.asarray(image_ids, np.int64)
    if use_ray is None:
        first = members.parse(paths[0]) if paths else None
        where = paths[0] if first is None else getattr(first, "shard", getattr(first, "file", ""))
        remote = len(paths) > 0 and "://" in where and not where.startswith("file://")
        threshold = RAY_MIN_REMOTE_FILES if remote else RAY_MIN_LOCAL_FILES
        use_ray = ray_address is not None or len(paths) >= threshold
    if not use_ray or len(paths) == 0:
        return scan_headers_local(ids, paths, max_pixels)

    import pyarrow as pa
    import ray
    from ray.data import TaskPoolStrategy

    from packer.ray_runtime import available_cpus, ensure_ray

    ensure_ray(ray_address, workers)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # navit reports progress itself
    # About four batches per CPU (load balance), 16..256 files each (task overhead vs. stragglers).
    cpus = workers or available_cpus()
    batch = int(min(_BATCH, max(16, -(-len(paths) // (4 * cpus)))))
    # Paths travel as bytes: a file name that is not valid UTF-8 (surrogate-escaped in Python) has
    # no Arrow string form.
    # Batches follow container order (tar shard + offset, Parquet row group), so a batch reads
    # neighbouring members and each Parquet row group is read by few batches; results are re-sorted
    # by image_id below.
    by_container = sorted(range(len(paths)), key=lambda j: members.order_key(paths[j]))
    ids = ids[by_container]
    paths = [paths[j] for j in by_container]
    raw_paths = [p.encode("utf-8", "surrogateescape") for p in paths]
    table = pa.table({"image_id": pa.array(ids, pa.int64()), "path": pa.array(raw_paths, pa.binary())})
    ds = ray.data.from_arrow([table.slice(s, batch) for s in range(0, len(paths), batch)])
    ds = ds.map_batches(
        _header_udf,
        batch_size=batch,
        batch_format="numpy",
        fn_kwargs={"max_pixels": max_pixels},
        num_cpus=1,
        compute=TaskPoolStrategy(size=workers) if workers else None,
        udf_modifying_row_count=False,
    )
    result = ds.to_arrow_refs()
    tables = [t for t in ray.get(result) if t.num_rows]
    merged = pa.concat_tables(tables) if tables else None
    if merged is None or merged.num_rows != len(paths):
        got = 0 if merged is None else merged.num_rows
        raise RuntimeError(f"header scan returned {got} rows for {len(paths)} files")
    order = np.argsort(merged.column("image_id").to_numpy(), kind="stable")  # deterministic order
    merged = merged.take(pa.array(order))
    return Headers(
        image_id=merged.column("image_id").to_numpy().astype(np.int64),
        width=merged.column("width").to_numpy().astype(np.int32),
        height=merged.column("height").to_numpy().astype(np.int32),
        orientation=merged.column("orientation").to_numpy().astype(np.int8),
        format=[str(x) for x in merged.column("format").to_pylist()],
        reason=[str(x) for x in merged.column("reason").to_pylist()],
    )
