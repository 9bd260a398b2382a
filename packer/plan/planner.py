"""The planner: source listing → header scan → crop, size and drop draws → bins. No pixel decoded.

:func:`scan_source` does the I/O once (listing and headers); :func:`make_plan` is pure and cheap, so
``navit plan --seq-len 256,512,1024`` scans once and plans three times. :func:`plan_source` is both
in one call (what ``navit pack`` uses per epoch).

Every input ends up either in the plan or in ``plan.rejected`` (``images_in == planned + rejected``).
Plan positions follow image_id order; sequences come from :func:`packer.plan.binpack.pack`, fed the
images in a seeded random order (:func:`packing_order`) so that rows mix classes. Sets larger than
``packing.partition_size`` are packed per contiguous range of that order — in parallel Ray tasks
when Ray is already up, else in turn — and concatenated: the plan does not depend on how
partitions ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packer.config import PackConfig
from packer.plan import binpack
from packer.plan.augment import sample_crops
from packer.plan.headers import Headers, scan_headers
from packer.plan.sampling import key_hash, sample_sizes, uniforms
from packer.plan.sources import Listing, list_source
from packer.plan.types import Plan, Rejection

# Random stream of the packing order (packer/plan/sampling.py uses 1-4, packer/plan/augment.py 16-20).
STREAM_PACK_ORDER = 32


def packing_order(keys: list, seed: int, epoch: int) -> np.ndarray:
    """The order (n,) int64 of plan positions in which images go to the packer: a seeded shuffle,
    a pure function of (seed, epoch, key) like every other draw.

    Not image_id order: image_ids follow the sorted keys, which for an ImageFolder (or any
    class-prefixed manifest) lists the images class by class, and every packer breaks ties (equal
    token counts) by input order — rows would hold one class each, and a training batch a handful
    of classes, which slows learning badly (measured on the `make demo` task: docs/planner.md)."""
    u = uniforms(seed, epoch, key_hash(keys), STREAM_PACK_ORDER)
    return np.argsort(u, kind="stable").astype(np.int64)


@dataclass
class Scan:
    """The I/O half of planning: inputs and their headers (``headers`` covers every input, in
    image_id order; inputs rejected while listing carry their listing reason there too)."""

    listing: Listing
    headers: Headers

    @property
    def images_in(self) -> int:
        return len(self.listing)


def scan_source(
    source: str,
    cfg: PackConfig,
    *,
    ray_address: str | None = None,
    workers: int | None = None,
    use_ray: bool | None = None,
) -> Scan:
    """List ``source`` and read every header (Ray Data for large lists, see headers.scan_headers)."""
    listing = list_source(source, cfg.source)
    valid = listing.valid
    ids = np.flatnonzero(valid)
    scanned = scan_headers(
        ids,
        [listing.paths[i] for i in ids],
        cfg.decode.max_pixels,
        ray_address=ray_address,
        workers=workers,
        use_ray=use_ray,
    )
    n = len(listing)
    headers = Headers(
        image_id=np.arange(n, dtype=np.int64),
        width=np.full(n, -1, np.int32),
        height=np.full(n, -1, np.int32),
        orientation=np.ones(n, np.int8),
        format=[""] * n,
        reason=[""] * n,
    )
    headers.width[ids], headers.height[ids], headers.orientation[ids] = (
        scanned.width,
        scanned.height,
        scanned.orientation,
    )
    for j, i in enumerate(ids):
        headers.format[i], headers.reason[i] = scanned.format[j], scanned.reason[j]
    for r in listing.rejected:
        headers.reason[r.image_id] = r.reason
    return Scan(listing, headers)


def _pack_one(lengths: np.ndarray, cfg: PackConfig) -> tuple[np.ndarray, np.ndarray]:
    pk = cfg.packing
    return binpack.pack(
        lengths,
        pk.seq_len,
        pk.max_images_per_seq,
        pk.packer,
        stream_window=pk.stream_window,
        stream_open_bins=pk.stream_open_bins,
    )


def pack_partitioned(lengths: np.ndarray, cfg: PackConfig) -> tuple[np.ndarray, np.ndarray]:
    """CSR (seq_offsets (S+1,), seq_members (n,)) int64 of ``lengths`` (n,), packed per partition of
    ``packing.partition_size`` consecutive images and concatenated in partition order."""
    size = cfg.packing.partition_size
    n = len(lengths)
    starts = list(range(0, n, size)) or [0]
    if len(starts) == 1:
        return _pack_one(lengths, cfg)
    parts: list[tuple[np.ndarray, np.ndarray]]
    import ray

    if ray.is_initialized():
        remote = ray.remote(num_cpus=1)(_pack_one)
        cfg_ref = ray.put(cfg)
        parts = ray.get([remote.remote(lengths[s : s + size], cfg_ref) for s in starts])
    else:
        parts = [_pack_one(lengths[s : s + size], cfg) for s in starts]
    offsets, members, base = [np.zeros(1, np.int64)], [], 0
    for s, (off, mem) in zip(starts, parts, strict=True):
        offsets.append(off[1:] + base)  # offsets index seq_members: shift by members so far
        members.append(mem + s)  # partition-local image index → plan position
        base += len(mem)
    return np.concatenate(offsets), np.concatenate(members)


def make_plan(scan: Scan, cfg: PackConfig, epoch: int = 0) -> Plan:
    """Draw crops (when augmenting), sizes and drops for every readable input, pack them, and record
    every rejection."""
    listing, headers = scan.listing, scan.headers
    ok = np.array([not r for r in headers.reason], dtype=bool)
    ids = np.flatnonzero(ok)  # plan position → image_id
    keys = [listing.keys[i] for i in ids]
    orig_h, orig_w = headers.height[ids], headers.width[ids]
    # Augmentation first: resolution sampling sizes the crop, so the plan knows its token count.
    crops = sample_crops(orig_h, orig_w, keys, cfg, epoch)
    s = sample_sizes(crops.height, crops.width, keys, cfg, epoch)
    n_full, n_kept = s["n_full"], s["n_kept"]
    order = packing_order(keys, cfg.seed, epoch)  # (n,) plan positions in packing order
    offsets, members = pack_partitioned(n_kept[order].astype(np.int64), cfg)
    members = order[members]  # packing-order index → plan position
    if cfg.packing.exact_fill and cfg.token_drop.kind != "none":
        n_kept = binpack.exact_fill(offsets, members, n_kept, n_full, cfg.packing.seq_len).astype(np.int32)
    rejected = [
        Rejection(int(i), listing.paths[i], headers.reason[i], int(listing.labels[i]))
        for i in np.flatnonzero(~ok)
    ]
    return Plan(
        epoch=epoch,
        seq_len=cfg.packing.seq_len,
        patch_size=cfg.packing.patch_size,
        image_id=ids.astype(np.int64),
        path=[listing.paths[i] for i in ids],
        key=keys,
        label=listing.labels[ids].astype(np.int64),
        orig_h=orig_h.astype(np.int32),
        orig_w=orig_w.astype(np.int32),
        grid_h=s["grid_h"],
        grid_w=s["grid_w"],
        n_full=n_full.astype(np.int32),
        n_kept=n_kept.astype(np.int32),
        seq_offsets=offsets.astype(np.int64),
        seq_members=members.astype(np.int64),
        rejected=rejected,
        classes=list(listing.classes),
        crop=np.stack([crops.x0, crops.y0, crops.x1, crops.y1], axis=1) if cfg.augment.active else None,
        hflip=crops.hflip if cfg.augment.active else None,
    )


def plan_source(
    source: str,
    cfg: PackConfig,
    *,
    epoch: int = 0,
    ray_address: str | None = None,
    workers: int | None = None,
) -> Plan:
    """Scan ``source`` and plan one epoch (deterministic in source, cfg and epoch)."""
    return make_plan(scan_source(source, cfg, ray_address=ray_address, workers=workers), cfg, epoch)
