"""Listing Parquet image-bytes datasets (Hugging Face style): one row = one image.

``pyarrow.parquet`` reads the schema from each file's footer and then, row group by row group, only
the small columns: the label column and the ``path`` field of a struct image column — never the image
bytes (those are read by row group when headers are scanned and shards built: packer.members). A file
is never loaded whole.

* Image column (``source.image_column``, default ``image``): binary, or struct{bytes, path} as
  ``datasets`` writes it. Any other type is a one-line error naming the column and its type.
* Label column (``source.label_column``, default ``label``): integer (kept; null → -1) or string
  (class names → index in sorted order, recorded as the pack's classes). Absent → unlabeled. Another
  type is a one-line error.
* Key: the row's ``path`` (normalised, POSIX separators) when the struct has one — so a folder
  converted to Parquet with relative paths plans exactly like the folder — else ``FILE#ROW``. A key
  seen before is a rejected duplicate (first file, then row, wins).
* A file that cannot be opened or whose footer is corrupt is one rejected input (key ``FILE/``).
"""

from __future__ import annotations

import posixpath

from packer import members
from packer.config import SourceConfig
from packer.errors import NavitError
from packer.plan.containers import container_listing


def _image_kind(field_type, name: str, where: str) -> bool:
    """True for struct{bytes, path}, False for plain binary; NavitError for anything else."""
    import pyarrow as pa

    if pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type):
        return False
    if pa.types.is_struct(field_type):
        names = [field_type.field(i).name for i in range(field_type.num_fields)]
        ok = "bytes" in names and (
            pa.types.is_binary(field_type.field("bytes").type)
            or pa.types.is_large_binary(field_type.field("bytes").type)
        )
        if ok and (
            "path" not in names
            or pa.types.is_string(field_type.field("path").type)
            or pa.types.is_large_string(field_type.field("path").type)
        ):
            return True
    raise NavitError(f"{where}: column {name!r} is {field_type}, expected binary or struct{{bytes, path}}")


def _check_label_type(field_type, name: str, where: str) -> None:
    import pyarrow as pa

    t = field_type.value_type if pa.types.is_dictionary(field_type) else field_type
    if not (
        pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
    ):
        raise NavitError(f"{where}: label column {name!r} is {field_type}, expected an integer or a string")


def has_image_column(location: str, cfg: SourceConfig) -> bool:
    """Whether a .parquet file is an image-bytes dataset (has the image column) rather than a manifest."""
    import pyarrow.parquet as pq

    try:
        with members.open_random_access(location) as f:
            return cfg.image_column in pq.ParquetFile(f).schema_arrow.names
    except Exception:  # unreadable: let the manifest reader report it
        return False


def _read_file(rel: str, location: str, cfg: SourceConfig, file_no: int, rows: list) -> str:
    """Append (key, file#, row, locator, label) for each row of one file; '' or why it is unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"parquet {rel}"
    try:
        f = members.open_random_access(location)
    except OSError as e:
        return f"unreadable parquet file: {str(e).splitlines()[0]}"
    with f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            return f"corrupt parquet file: {str(e).splitlines()[0]}"
        schema = pf.schema_arrow
        col, lab = cfg.image_column, cfg.label_column
        if col not in schema.names:
            raise NavitError(
                f"{where}: no image column {col!r} (columns: {', '.join(schema.names)}); "
                "choose one with --image-column NAME (or --set source.image_column=NAME)"
            )
        has_path = _image_kind(schema.field(col).type, col, where) and "path" in [
            schema.field(col).type.field(i).name for i in range(schema.field(col).type.num_fields)
        ]
        use_label = lab in schema.names and cfg.labels != "none"
        if use_label:
            _check_label_type(schema.field(lab).type, lab, where)
        wanted = ([f"{col}.path"] if has_path else []) + ([lab] if use_label else [])
        row = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            try:
                table = pf.read_row_group(g, columns=wanted) if wanted else None
            except (pa.ArrowException, OSError, ValueError) as e:
                return f"corrupt parquet file: row group {g}: {str(e).splitlines()[0]}"
            paths = table.column(col).combine_chunks().field("path").to_pylist() if has_path else [None] * n
            labels = table.column(lab).to_pylist() if use_label else [None] * n
            for i in range(n):
                p = paths[i]
                key = posixpath.normpath(p.replace("\\", "/")) if p else f"{rel}#{row}"
                rows.append((key, file_no, row, members.parquet_locator(location, col, g, i, row), labels[i]))
                row += 1
    return ""


def list_parquet(source: str, files: list[tuple[str, str]], cfg: SourceConfig, skipped: list):  # -> Listing
    rows: list[tuple[str, int, int, str, int | str | None]] = []
    damaged: dict[int, str] = {}
    for n, (rel, location) in enumerate(files):
        reason = _read_file(rel, location, cfg, n, rows)
        if reason:
            damaged[len(rows)] = reason
            rows.append((rel + "/", n, -1, location, None))
    order = sorted(range(len(rows)), key=lambda j: rows[j][:3])
    reasons = [damaged.get(j, "") for j in order]
    rows = [rows[j] for j in order]
    for i in range(1, len(rows)):
        if rows[i][0] == rows[i - 1][0] and not reasons[i]:
            reasons[i] = f"duplicate key: also {members.describe(rows[i - 1][3])}"
    return container_listing(source, rows, reasons, skipped, cfg.labels)
