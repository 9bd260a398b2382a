"""Reading ``images.parquet`` (its schema is :data:`packer.schema.IMAGES_SCHEMA`), packs written
before the augmentation columns existed included. Re-exported as ``packer.schema.read_images``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from packer.errors import DataError


def read_images(data_dir: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """Read ``images.parquet`` (optionally some columns / a pyarrow ``filters`` expression), with the
    augmentation columns filled in for packs written before they existed: those packs never
    augmented, so every planned image's crop is the whole image (0, 0, orig_w, orig_h), unflipped.
    DataError (one line) if the file is missing or unreadable."""
    from packer.schema import AUGMENT_COLUMNS, IMAGES_FILE, IMAGES_SCHEMA, join, resolve_fs

    fs, base = resolve_fs(data_dir)
    path = join(base, IMAGES_FILE)
    try:
        with fs.open_input_file(path) as f:
            present = set(pq.read_schema(f).names)
            wanted = list(columns) if columns is not None else [fld.name for fld in IMAGES_SCHEMA]
            missing = [c for c in wanted if c in AUGMENT_COLUMNS and c not in present]
            read = [c for c in wanted if c in present]
            if missing:
                read += [c for c in ("orig_h", "orig_w", "grid_h") if c not in read]
            table = pq.read_table(f, columns=read, filters=filters, page_checksum_verification=True)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{data_dir}/{IMAGES_FILE}: cannot be read ({str(e).splitlines()[0]})") from None
    if missing:
        planned = pc.greater_equal(table.column("grid_h"), 0)
        fill = {
            "crop_x0": pc.if_else(planned, 0, -1),
            "crop_y0": pc.if_else(planned, 0, -1),
            "crop_x1": pc.if_else(planned, table.column("orig_w"), -1),
            "crop_y1": pc.if_else(planned, table.column("orig_h"), -1),
            "hflip": pa.array(np.zeros(table.num_rows, bool)),
        }
        for c in missing:
            field = IMAGES_SCHEMA.field(c)
            table = table.append_column(field, fill[c].cast(field.type))
    return table.select(wanted)
