"""Listing WebDataset tar shards: samples, their image member, label and byte offsets.

Stdlib ``tarfile`` walks each shard's headers and gives every member's data offset and size, so an
image is later read by offset (packer.members) — nothing is extracted. Object-store shards are read
through an 8 MiB buffer: ``tarfile`` skips member data by seeking forward, which stays inside the
buffer, so listing a shard costs a few large ranged reads instead of one request per header.

WebDataset conventions: a sample is a run of consecutive members sharing a key (the member name up to
the first dot of its base name; the rest is the extension). The image is the first member whose
extension is an accepted image extension (``source.extensions``); the label is ``.cls`` (an integer,
or a class name) or the ``source.label_field`` field of ``.json`` (integer or class name); neither →
unlabeled (-1).

The key of a sample's image is the image member's name (``cats/0007.jpg``), without the shard: the
same images packed from a folder, from tar shards or from Parquet get the same keys, hence the same
draws and byte-identical shards, and re-sharding a set does not change its plan. Everything that
cannot be packed is a recorded rejection, never a silent loss: a sample without an image member, a
truncated member, a key seen before (in this shard or an earlier one), an unreadable label, and a
corrupt shard (key ``SHARD/``; the members before the damage are kept).
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field

from packer import members
from packer.config import SourceConfig
from packer.plan.containers import container_listing

_REMOTE_BUFFER = 8 << 20
_BLOCK = 512


@dataclass
class _Sample:
    key: str  # WebDataset __key__
    shard: str  # location
    offset: int  # header offset of its first member (tar order)
    image: tarfile.TarInfo | None = None
    exts: list[str] = field(default_factory=list)
    extra_images: list[str] = field(default_factory=list)
    labels: dict[str, int | str | None] = field(default_factory=dict)  # by extension: cls, json
    problem: str = ""

    @property
    def label(self) -> int | str | None:
        return self.labels.get("cls", self.labels.get("json"))


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: ``dir/a.b.c`` → key ``dir/a``, extension ``b.c``."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _open_shard(location: str):  # -> (file object, total size)
    f = members.open_random_access(location)
    if hasattr(f, "read_at"):  # object storage: big buffered reads, tarfile seeks inside the buffer
        size = f.size()
        return io.BufferedReader(members._Window(f, 0, size), _REMOTE_BUFFER), size
    import os

    return f, os.fstat(f.fileno()).st_size


def _parse_label(kind: str, data: bytes, label_field: str) -> int | str | None:
    text = data.decode("utf-8").strip()
    if kind == "cls":
        return int(text) if text.lstrip("-").isdigit() else (text or None)
    value = json.loads(text).get(label_field) if text else None
    if value is None or isinstance(value, str | int) and not isinstance(value, bool):
        return value
    raise ValueError(f"field {label_field!r} is {type(value).__name__}, expected an integer or a string")


def read_shard(location: str, cfg: SourceConfig) -> tuple[list[_Sample], str]:
    """The samples of one shard, in tar order, and '' or the reason the shard is damaged."""
    exts = tuple(e.lower().lstrip(".") for e in cfg.extensions)
    samples: list[_Sample] = []
    count = 0
    try:
        f, total = _open_shard(location)
    except OSError as e:
        from packer.imagefile import unreadable_reason

        return [], unreadable_reason(e).replace("unreadable path", "unreadable tar shard", 1)
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 (f is closed by the with above)
            while True:
                info = tf.next()
                if info is None:
                    break
                count += 1
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                if not samples or samples[-1].key != key or samples[-1].shard != location:
                    samples.append(_Sample(key, location, info.offset))
                s = samples[-1]
                s.exts.append(ext)
                if info.offset_data + info.size > total:  # the file ends inside this member
                    s.problem = s.problem or (
                        f"truncated tar member: {max(0, total - info.offset_data)} of {info.size} bytes"
                    )
                    if ext.lower() in exts and s.image is None:
                        s.image = info  # keyed by its name; rejected for the truncation
                    return samples, ""  # nothing can follow; the member carries the reason
                if ext.lower() in exts:
                    if s.image is None:
                        s.image = info
                    else:
                        s.extra_images.append(info.name)
                elif ext in ("cls", "json") and ext not in s.labels:
                    try:
                        s.labels[ext] = _parse_label(ext, tf.extractfile(info).read(), cfg.label_field)
                    except (ValueError, UnicodeDecodeError, AttributeError) as e:
                        s.problem = s.problem or f"unreadable .{ext} label: {str(e).splitlines()[0]}"
            # tarfile stops quietly at a header it cannot parse: anything but the end-of-archive
            # marker (zero blocks) or the end of the file there is damage, and the rest is lost.
            f.seek(tf.offset)
            rest = f.read(_BLOCK)
            if rest and rest.strip(b"\0"):
                return samples, f"corrupt tar: invalid header at byte {tf.offset} after {count} members"
            if rest and len(rest) < _BLOCK and tf.offset < total:
                return samples, f"corrupt tar: truncated header at byte {tf.offset} after {count} members"
        except (tarfile.TarError, OSError, EOFError) as e:
            return samples, f"corrupt tar: {str(e).splitlines()[0] or type(e).__name__} after {count} members"
    return samples, ""


def list_wds(source: str, files: list[tuple[str, str]], cfg: SourceConfig, skipped: list):  # -> Listing
    from packer.plan.sources import Skipped

    rows: list[
        tuple[str, int, int, str, int | str | None, str]
    ] = []  # key, shard#, offset, path, label, reason
    for n, (rel, location) in enumerate(files):
        samples, damage = read_shard(location, cfg)
        if damage:
            rows.append((rel + "/", n, 0, location, None, damage))
        for s in samples:
            where = f"{location}#{s.key}"
            if s.image is not None:
                key = s.image.name
                where = members.tar_locator(location, key, s.image.offset_data, s.image.size)
            else:
                key = s.key
            reason = s.problem
            if not reason and s.image is None:
                reason = f"no image member in sample (members: {', '.join('.' + e for e in s.exts)})"
            for extra in s.extra_images:
                skipped.append(Skipped(f"{location}#{extra}", f"second image member of sample {s.key}"))
            rows.append((key, n, s.offset, where, s.label, reason))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))  # duplicates: the first shard (then offset) wins
    reasons = [r[5] for r in rows]
    for i in range(1, len(rows)):
        if rows[i][0] == rows[i - 1][0] and not rows[i][0].endswith("/"):
            reasons[i] = reasons[i] or f"duplicate key: also in {files[rows[i - 1][1]][1]}"
    return container_listing(source, rows, reasons, skipped, cfg.labels)
