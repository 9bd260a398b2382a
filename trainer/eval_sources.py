"""`navit eval` on WebDataset tar shards and Parquet image-bytes sources (packer/plan/sources.py
lists them as `navit pack` does); ImageFolders keep :func:`trainer.evaluate.list_image_folder`.

Packer stages are imported inside the functions: the trainer never imports them at import time.
"""

from __future__ import annotations

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


def list_container_images(
    root: str | Path, class_names: list[str] | None = None
) -> tuple[list[str], list[int]]:
    """(locators, labels) of every input; an input rejected while listing gets the locator '' (its
    decode fails, so it is counted as skipped, never dropped silently). Class names recorded by the
    source map to the checkpoint's class indices; integer labels are used as they are."""
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
    rejected = {r.image_id for r in listing.rejected}
    paths = ["" if i in rejected else p for i, p in enumerate(listing.paths)]
    if not paths:
        raise NavitError(f"{root}: no images")
    return paths, labels


def decode_many(paths: list[str | Path]) -> list[np.ndarray | None]:
    """Upright RGB (H, W, 3) uint8 per path with the packer's decoder, None when undecodable; Parquet
    rows are read one row group at a time (packer.members.read_many)."""
    from packer import members
    from packer.build import decode
    from packer.config import DecodeConfig

    texts = [str(p) for p in paths]
    prefetched = members.read_many(texts)
    out: list[np.ndarray | None] = []
    for p in texts:
        try:
            data = prefetched.get(p)
            if isinstance(data, members.MemberError) or not p:
                raise decode.DecodeError("unreadable")
            img, _ = decode.decode_rgb(
                data if data is not None else decode.read_bytes(p), None, DecodeConfig()
            )
        except decode.DecodeError:
            out.append(None)
            continue
        out.append(np.asarray(img, dtype=np.uint8))
    return out
