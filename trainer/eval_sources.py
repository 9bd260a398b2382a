"""`navit eval` on WebDataset tar shards and Parquet image-bytes sources (packer/plan/sources.py
lists them as `navit pack` does); ImageFolders keep :func:`trainer.evaluate.list_image_folder`.

Packer stages are imported inside the functions: the trainer never imports them at import time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from packer.errors import NavitError


def is_container_source(root: str | Path) -> bool:
    """A .tar / .parquet file, a pattern of them, or a local folder holding only such files."""
    from packer.plan.containers import names_containers

    text = str(root)
    if names_containers(text):
        return True
    base = Path(text)
    if "://" in text or not base.is_dir():
        return False
    files = [p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(p.suffix.lower() in (".tar", ".parquet") for p in files)


def iter_container_chunks(
    root: str | Path,
    class_names: list[str] | None = None,
    chunk_images: int = 256,
    rejected: list[dict[str, str]] | None = None,
) -> Iterator[tuple[list[tuple[np.ndarray, int]], int]]:
    """:func:`trainer.evaluate.iter_folder_chunks` for a container source: inputs listed as `navit
    pack` lists them (an input rejected while listing keeps its reason: duplicate key, no image
    member, truncated member…), Parquet rows read one row group at a time, tar members by offset.
    Class names recorded by the source map to the checkpoint's class indices; integer labels are
    used as they are."""
    from packer import members
    from packer.build import decode
    from packer.config import DecodeConfig
    from packer.plan.sources import list_source

    listing = list_source(str(root))
    labels = listing.labels.tolist()
    if listing.classes and class_names:
        unknown = [c for c in listing.classes if c not in class_names]
        if unknown:
            raise NavitError(
                f"{root}: classes {unknown[:3]} are not classes of this checkpoint {class_names[:6]}"
            )
        labels = [-1 if lab < 0 else class_names.index(listing.classes[lab]) for lab in labels]
    if not len(listing):
        raise NavitError(f"{root}: no images")
    listed_reason = {r.image_id: r.reason for r in listing.rejected}
    for start in range(0, len(listing), chunk_images):
        ids = range(start, min(start + chunk_images, len(listing)))
        prefetched = members.read_many(listing.paths[i] for i in ids if i not in listed_reason)
        good, bad = [], 0
        for i in ids:
            reason = listed_reason.get(i, "")
            if not reason:
                data = prefetched.get(listing.paths[i])
                try:
                    if isinstance(data, members.MemberError):
                        raise decode.DecodeError(data.reason)
                    raw = data if data is not None else decode.read_bytes(listing.paths[i])
                    img, _ = decode.decode_rgb(raw, None, DecodeConfig())
                    good.append((np.asarray(img, dtype=np.uint8), labels[i]))
                    continue
                except decode.DecodeError as e:
                    reason = e.reason
            bad += 1
            if rejected is not None:
                rejected.append({"path": members.describe(listing.paths[i]), "reason": reason})
        yield good, bad
