"""`navit synth --format wds|parquet`: the synthetic set of :mod:`packer.synth` in the layouts datasets
ship in, with the same images, keys and labels as the ImageFolder layout — so a pack of each is
byte-identical (tests and the source benchmark rely on that).

* ``wds``: WebDataset tar shards ``OUT/shard-000000.tar`` … of ``shard_size`` samples; each sample is
  ``<class>/img_000123.<jpg|png>`` (the image, named like its folder-layout path) and
  ``<class>/img_000123.cls`` (the class index, the folder layout's label).
* ``parquet``: files ``OUT/part-000000.parquet`` … of ``shard_size`` rows, row groups of
  ``ROW_GROUP_ROWS``; column ``image`` struct{bytes, path} (Hugging Face's image layout, path = the
  folder-layout path) and ``label`` int64.

Files are deterministic (tar headers with fixed mtime/owner, fixed Parquet writer options) and
written atomically (temp + rename). Samples are written in image-index order; nothing holds more than
one shard's images in memory.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packer.synth import SynthImage, synth_one, task_classes

FORMATS = ("folder", "wds", "parquet")
ROW_GROUP_ROWS = 64


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_wds_shard(path: Path, items: list[tuple[SynthImage, bytes]]) -> None:
    tmp = _tmp(path)
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for info, data in items:
            _tar_add(tf, info.relpath, data)
            key = info.relpath.rsplit(".", 1)[0]
            _tar_add(tf, f"{key}.cls", str(info.label).encode())
    os.replace(tmp, path)


def write_parquet_file(path: Path, items: list[tuple[SynthImage, bytes]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": d, "path": i.relpath} for i, d in items], image_type),
            "label": pa.array([i.label for i, _ in items], pa.int64()),
        }
    )
    tmp = _tmp(path)
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="none", write_statistics=False)
    os.replace(tmp, path)


def generate_as(
    out: str | Path,
    fmt: str,
    n: int = 600,
    seed: int = 0,
    task: str = "shapes",
    shard_size: int = 1000,
    threads: int | None = None,
) -> list[SynthImage]:
    """Write ``n`` images of ``task`` into ``out`` as ``fmt`` ('wds' or 'parquet'; 'folder' is
    :func:`packer.synth.generate`); returns what was written, in index order."""
    if fmt not in ("wds", "parquet"):
        raise ValueError(f"format must be wds or parquet, not {fmt!r}")
    if n < 0 or shard_size < 1:
        raise ValueError("n must be >= 0 and shard_size >= 1")
    classes = task_classes(task, None)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    written: list[SynthImage] = []
    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for k, ids in enumerate(_chunks(n, shard_size)):
            items = list(pool.map(lambda i: synth_one(seed, i, classes, task), ids))
            if fmt == "wds":
                write_wds_shard(root / f"shard-{k:06d}.tar", items)
            else:
                write_parquet_file(root / f"part-{k:06d}.parquet", items)
            written += [info for info, _ in items]
    return written
