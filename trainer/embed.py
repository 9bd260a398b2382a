"""`navit embed`: pooled embeddings (and top-k predictions) of every image of a source, to Parquet.

The source is listed by the packer's own listing (``packer.plan.sources.list_source``: folders,
manifests, object-store URIs — whatever `navit pack` reads), so every source kind `pack` gains works
here. Images are handled in chunks of ``chunk_images`` in listing order: decoded on a thread pool
with the packer's decoder (EXIF orientation, any mode → RGB, JPEG draft), resized to a patch grid —
the image's own size (``native``) or longer side ``N`` px, aspect ratio kept, at most ``seq_len``
tokens — packed best-fit-decreasing into rows of ``seq_len`` tokens like training (no padding to a
square), and run through the model ``batch_tokens // seq_len`` rows at a time; the next chunk decodes
while the model runs. Memory is bounded by two chunks whatever the number of images. Attention never
crosses images, so an image's embedding does not depend on what it was packed with.

Output: one Parquet row per input image, in listing order (``image_id``), with its key, path, label,
status and — for a readable image — source size, grid, token count, embedding and top-k; an
unreadable image has ``ok = false`` and a ``reason``. The file is written to a temp name and renamed
into place: it appears whole or not at all. The schema's metadata ``navit.embed`` (JSON) records the
model, resolution and settings.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from packer.errors import NavitError

EMBED_META_KEY = b"navit.embed"


@dataclass
class LoadedModel:
    net: torch.nn.Module
    patch_size: int
    seq_len: int | None  # rows the model was trained on (None: unknown, e.g. a converted export)
    class_names: list[str] | None
    description: dict[str, Any]  # where it came from (recorded in the output)


def load_any_model(path: str | Path, device: torch.device) -> LoadedModel:
    """A `navit export` folder, a checkpoint folder, a run folder (its newest checkpoint), or a timm
    ViT state dict file (converted as ``--init-from`` does)."""
    from model import NaViT, NaViTConfig
    from model.pretrained import PretrainedError, is_export, read_export
    from trainer.checkpoint import load_checkpoint

    p = Path(path)
    if not p.exists():
        raise NavitError(f"checkpoint not found: {path}")
    if p.is_file():  # a timm ViT state dict: converted on the fly (trainer/init_from.py)
        from trainer.init_from import read_init_source

        src = read_init_source(p, what="checkpoint")
        meta, weights, desc = {"model_config": src.model_config}, src.weights, src.record()
        for note in src.notes:
            print(f"note: {note}", file=sys.stderr)
    elif is_export(p):
        try:
            meta, weights = read_export(p)
        except PretrainedError as e:
            raise NavitError(str(e)) from None
        desc = {"export": str(p), **meta.get("source", {})}
    else:
        ck = load_checkpoint(p)
        meta, weights = ck.meta, ck.weights
        desc = {"checkpoint": str(ck.path), "step": ck.step}
    try:
        net = NaViT(NaViTConfig.from_dict(meta["model_config"]))
        net.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0]
        raise NavitError(f"{path}: weights do not load into the recorded model ({msg})") from None
    seq_len = meta.get("seq_len")
    return LoadedModel(
        net.to(device).eval(),
        int(net.cfg.patch_size),
        int(seq_len) if seq_len else None,
        meta.get("class_names"),
        desc,
    )


@dataclass
class EmbedSummary:
    images_in: int = 0
    embedded: int = 0
    rejected: int = 0
    skipped_files: int = 0  # not inputs (hidden, other extensions), as `navit pack` reports them
    real_tokens: int = 0
    row_tokens: int = 0  # rows x seq_len: the padding is row_tokens - real_tokens
    seconds: float = 0.0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def output_schema(dim: int, dtype: str, with_names: bool, meta: dict[str, Any]) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("path", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("ok", pa.bool_(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("width", pa.int32()),  # upright source size, pixels
        pa.field("height", pa.int32()),
        pa.field("grid_h", pa.int32()),  # patch grid used; pixels used = grid x patch_size
        pa.field("grid_w", pa.int32()),
        pa.field("tokens", pa.int32()),
        pa.field("embedding", pa.list_(value, dim)),
        pa.field("topk_ids", pa.list_(pa.int32())),
        pa.field("topk_probs", pa.list_(pa.float32())),
    ]
    if with_names:
        fields.append(pa.field("topk_names", pa.list_(pa.string())))
    return pa.schema(fields, metadata={EMBED_META_KEY: json.dumps(meta, sort_keys=True).encode()})


@dataclass
class _Decoded:
    arr: np.ndarray | None = None  # (gh·p, gw·p, 3) uint8 resized image
    width: int = 0
    height: int = 0
    reason: str | None = None


def _decode_one(path: str, resolution: int | None, patch: int, max_tokens: int) -> _Decoded:
    from packer.build import decode
    from packer.config import DecodeConfig
    from trainer.evaluate import target_grid

    cfg = DecodeConfig()
    try:
        data = decode.read_bytes(path)
        header = decode.open_image(data, cfg.max_pixels)
        w, h = header.size
        if decode.exif_orientation(header) in (5, 6, 7, 8):
            w, h = h, w
        gh, gw = target_grid(h, w, resolution, patch, max_tokens)
        arr = decode.load_resized(data, gh, gw, patch, cfg)
    except decode.DecodeError as e:
        return _Decoded(reason=e.reason)
    return _Decoded(arr, w, h)


def _forward_chunk(
    net: torch.nn.Module,
    images: list[np.ndarray],
    patch: int,
    seq_len: int,
    rows_per_forward: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Embeddings (n, D) and logits (n, C) or None of ``images`` in their order, and the rows used."""
    from packer.plan.binpack import pack
    from trainer.batch import collate_rows
    from trainer.evaluate import _batched, pack_rows, packed_to_rows

    lengths = np.array([(a.shape[0] // patch) * (a.shape[1] // patch) for a in images], np.int64)
    offsets, members = pack(lengths, seq_len, max_images=seq_len, algorithm="bfd")
    order = members.astype(np.int64)  # images in row order, rows consecutive
    # Next-fit over the bfd order (pack_rows): every bfd row fits, so it needs no more rows than bfd.
    packed = pack_rows([images[i] for i in order], list(range(len(order))), patch, seq_len)
    rows = packed_to_rows(packed)
    embs: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    positions: list[np.ndarray] = []
    for part in _batched(rows, rows_per_forward):
        batch = collate_rows(part).to(device)
        positions.append(batch.pop("labels").cpu().numpy())  # the image's place in `order`
        out = net(batch)
        embs.append(out.embeddings.float().cpu())
        if out.logits is not None:
            logits.append(out.logits.float().cpu())
    where = order[np.concatenate(positions)]  # output k is image where[k]
    inverse = torch.from_numpy(np.argsort(where, kind="stable"))
    emb = torch.cat(embs)[inverse]
    lg = torch.cat(logits)[inverse] if logits else None
    return emb, lg, len(rows)


def embed_source(
    loaded: LoadedModel,
    source: str,
    out: str | Path,
    *,
    resolution: int | None,
    seq_len: int,
    batch_tokens: int,
    device: torch.device,
    dtype: str = "float32",
    topk: int = 5,
    chunk_images: int = 256,
    workers: int = 2,
    progress: Callable[[int, int, EmbedSummary], None] | None = None,
    on_listed: Callable[[int], None] | None = None,
) -> EmbedSummary:
    """Embed every image of ``source`` into the Parquet file ``out`` (see the module docstring)."""
    import pyarrow.parquet as pq

    from packer.config import SourceConfig
    from packer.plan.sources import list_source, printable

    dest = Path(out)
    if dest.is_dir():
        raise NavitError(f"--out {out}: is a folder (give a .parquet file name)")
    t0 = time.perf_counter()
    listing = list_source(source, SourceConfig())
    n = len(listing)
    if on_listed is not None:
        on_listed(n)
    net, patch = loaded.net, loaded.patch_size
    head_classes = int(getattr(net.cfg, "num_classes", 0))
    k = min(topk, head_classes)
    names = loaded.class_names if loaded.class_names and len(loaded.class_names) == head_classes else None
    meta = {
        "model": loaded.description,
        "model_config": net.cfg.to_dict(),
        "source": printable(source),
        "resolution": "native" if resolution is None else resolution,
        "seq_len": seq_len,
        "patch_size": patch,
        "dtype": dtype,
        "topk": k,
        "class_names": names,
    }
    schema = output_schema(net.cfg.dim, dtype, names is not None, meta)
    summary = EmbedSummary(images_in=n, skipped_files=len(listing.skipped))
    listed_reason = {r.image_id: r.reason for r in listing.rejected}
    rows_per_forward = max(1, batch_tokens // seq_len)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    starts = list(range(0, n, chunk_images))
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, pq.ParquetWriter(tmp, schema) as writer:

            def submit(start: int) -> list[Future[_Decoded] | _Decoded]:
                ids = range(start, min(start + chunk_images, n))
                return [
                    _Decoded(reason=listed_reason[i])
                    if i in listed_reason
                    else pool.submit(_decode_one, listing.paths[i], resolution, patch, seq_len)
                    for i in ids
                ]

            pending = submit(starts[0]) if starts else []
            for c, start in enumerate(starts):
                decoded = [d.result() if isinstance(d, Future) else d for d in pending]
                # The next chunk decodes on the pool while this one runs through the model.
                pending = submit(starts[c + 1]) if c + 1 < len(starts) else []
                good = [j for j, d in enumerate(decoded) if d.arr is not None]
                emb = lg = None
                if good:
                    with torch.no_grad():  # as navit eval
                        emb, lg, n_rows = _forward_chunk(
                            net, [decoded[j].arr for j in good], patch, seq_len, rows_per_forward, device
                        )
                    summary.row_tokens += n_rows * seq_len
                table = _chunk_table(schema, listing, start, decoded, good, emb, lg, k, names, patch, dtype)
                writer.write_table(table)
                for d in decoded:
                    if d.arr is None:
                        summary.rejected += 1
                        reason = d.reason or "unknown"
                        summary.rejected_by_reason[reason] = summary.rejected_by_reason.get(reason, 0) + 1
                    else:
                        summary.embedded += 1
                        summary.real_tokens += (d.arr.shape[0] // patch) * (d.arr.shape[1] // patch)
                summary.seconds = time.perf_counter() - t0
                if progress is not None:
                    progress(start + len(decoded), n, summary)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    summary.seconds = time.perf_counter() - t0
    return summary


def _chunk_table(
    schema: pa.Schema,
    listing: Any,
    start: int,
    decoded: list[_Decoded],
    good: list[int],
    emb: torch.Tensor | None,
    logits: torch.Tensor | None,
    k: int,
    names: list[str] | None,
    patch: int,
    dtype: str,
) -> pa.Table:
    from packer.plan.sources import printable

    m = len(decoded)
    dim = schema.field("embedding").type.list_size
    ids = np.arange(start, start + m, dtype=np.int64)
    ok = np.array([d.arr is not None for d in decoded])
    values = np.zeros((m, dim), np.float16 if dtype == "float16" else np.float32)
    top_ids: list[Any] = [None] * m
    top_p: list[Any] = [None] * m
    if emb is not None:
        values[good] = emb.numpy().astype(values.dtype)
        if logits is not None and k > 0:
            probs, idx = logits.softmax(-1).topk(k, dim=-1)
            for j, row_ids, row_p in zip(good, idx.tolist(), probs.tolist(), strict=True):
                top_ids[j], top_p[j] = row_ids, row_p
    flat = pa.array(values.reshape(-1))
    emb_col = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~ok))

    def per_image(f: Callable[[_Decoded], Any]) -> list[Any]:
        return [f(d) if d.arr is not None else None for d in decoded]

    cols = {
        "image_id": ids,
        "key": [printable(listing.keys[i]) for i in ids],
        "path": [printable(listing.paths[i]) for i in ids],
        "label": listing.labels[start : start + m],
        "ok": ok,
        "reason": [None if d.arr is not None else d.reason for d in decoded],
        "width": per_image(lambda d: d.width),
        "height": per_image(lambda d: d.height),
        "grid_h": per_image(lambda d: d.arr.shape[0] // patch),
        "grid_w": per_image(lambda d: d.arr.shape[1] // patch),
        "tokens": per_image(lambda d: (d.arr.shape[0] // patch) * (d.arr.shape[1] // patch)),
        "embedding": emb_col,
        "topk_ids": top_ids,
        "topk_probs": top_p,
    }
    if names is not None:
        cols["topk_names"] = [None if t is None else [names[c] for c in t] for t in top_ids]
    arrays = [c if isinstance(c := cols[f.name], pa.Array) else pa.array(c, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)
