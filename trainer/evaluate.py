"""`navit eval`: top-1 / top-5 accuracy of a trained classifier at several resolutions.

NaViT's point is one model for any resolution at inference, so the same checkpoint is evaluated on a
labeled image folder resized so that the longer side is each requested resolution (aspect ratio
kept, rounded to whole patches, capped at the training ``seq_len`` tokens per image), or at the
images' native size (``native``, capped the same way), or squashed to a square (``sqN``: N x N
pixels, aspect ratio lost, as a plain ViT's resize). Images are decoded in-process with the
packer's decoder (Pillow-SIMD, EXIF orientation, any mode → RGB) and packed next-fit into rows of the
training ``seq_len``; no Ray. A shard set is evaluated as packed (its resolution is the pack's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from packer import schema
from packer.errors import DataError, NavitError
from trainer.batch import HostBatch, Rows, collate_rows

# ----------------------------------------------------------------------------------------------------
# numpy images → packed rows
# ----------------------------------------------------------------------------------------------------


def patchify(img: np.ndarray, patch: int) -> np.ndarray:
    """(gh·p, gw·p, 3) uint8 → (gh·gw, p·p·3): row-major grid, each patch in (row, col, channel)."""
    h, w, c = img.shape
    gh, gw = h // patch, w // patch
    return img.reshape(gh, patch, gw, patch, c).transpose(0, 2, 1, 3, 4).reshape(gh * gw, patch * patch * c)


def pack_rows(
    images: list[np.ndarray],
    labels: list[int],
    patch: int,
    seq_len: int,
    max_images: int | None = None,
) -> schema.PackedRows:
    """Next-fit pack whole images (sides multiples of ``patch``, ≤ seq_len tokens each), in order,
    into rows of ``seq_len`` tokens; no token dropping. Returns shard-ready numpy rows."""
    d = patch * patch * 3
    groups: list[list[int]] = []
    used = seq_len + 1
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        if h % patch or w % patch:
            raise ValueError(f"image {i}: {h}x{w} is not a multiple of the patch size {patch}")
        n = (h // patch) * (w // patch)
        if n > seq_len:
            raise ValueError(f"image {i}: {n} tokens > seq_len {seq_len}")
        if used + n > seq_len or (max_images is not None and len(groups[-1]) >= max_images):
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    r = len(groups)
    patches = np.zeros((r, seq_len, d), np.uint8)
    seg = np.zeros((r, seq_len), np.int16)
    ph = np.zeros((r, seq_len), np.int16)
    pw = np.zeros((r, seq_len), np.int16)
    ids, labs, ghs, gws, full = [], [], [], [], []
    for row, members in enumerate(groups):
        at = 0
        gh_list, gw_list = [], []
        for k, i in enumerate(members, start=1):
            img = images[i]
            gh, gw = img.shape[0] // patch, img.shape[1] // patch
            n = gh * gw
            patches[row, at : at + n] = patchify(img, patch)
            seg[row, at : at + n] = k
            ph[row, at : at + n] = np.repeat(np.arange(gh), gw)
            pw[row, at : at + n] = np.tile(np.arange(gw), gh)
            at += n
            gh_list.append(gh)
            gw_list.append(gw)
        ids.append(np.asarray(members, np.int64))
        labs.append(np.asarray([labels[i] for i in members], np.int64))
        ghs.append(np.asarray(gh_list, np.int32))
        gws.append(np.asarray(gw_list, np.int32))
        full.append(np.asarray([a * b for a, b in zip(gh_list, gw_list, strict=True)], np.int32))
    return schema.PackedRows(patches, seg, ph, pw, ids, labs, ghs, gws, full)


def packed_to_rows(p: schema.PackedRows) -> Rows:
    return Rows(p.patches, p.segment_ids, p.pos_h, p.pos_w, p.labels, p.grid_h, p.grid_w)


@dataclass(frozen=True)
class Square:
    """An eval resolution that squashes every image to ``side`` x ``side`` pixels, aspect ratio NOT
    kept — what a plain ViT's resize does (``sq64`` on the command line). Shows what a model loses
    when its inputs are squashed (e.g. ``navit synth --task aspect``, whose classes depend on it)."""

    side: int

    def __str__(self) -> str:
        return f"sq{self.side}"


def square_grid(side: int, patch: int, max_tokens: int) -> tuple[int, int]:
    """(g, g): ``side`` px in whole patches, at least one, at most ``max_tokens`` patches."""
    g = min(max(1, round(side / patch)), math.isqrt(max_tokens))
    return g, g


def target_grid(h: int, w: int, resolution: int | None, patch: int, max_tokens: int) -> tuple[int, int]:
    """Patch grid for an h×w image: longer side = ``resolution`` px (None = native), aspect kept,
    at least one patch per side, at most ``max_tokens`` patches."""
    scale = 1.0 if resolution is None else resolution / max(h, w)
    gh = max(1, round(h * scale / patch))
    gw = max(1, round(w * scale / patch))
    if gh * gw > max_tokens:
        # Shrink both sides by the same factor until the grid fits.
        f = math.sqrt(max_tokens / (gh * gw))
        gh, gw = max(1, int(gh * f)), max(1, int(gw * f))
        while gh * gw > max_tokens:
            if gh >= gw:
                gh -= 1
            else:
                gw -= 1
    return gh, gw


# ----------------------------------------------------------------------------------------------------
# Sources of labeled images
# ----------------------------------------------------------------------------------------------------


def list_image_folder(root: str | Path, class_names: list[str] | None = None) -> tuple[list[Path], list[int]]:
    """ImageFolder layout: label = index of the first-level folder in ``class_names`` (default: the
    sorted folder names, as `navit pack` assigns them). NavitError if empty or a folder is unknown."""
    from packer.config import IMAGE_EXTENSIONS

    base = Path(root)
    if not base.is_dir():
        raise NavitError(f"{root}: not a directory")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(class_names) if class_names else folders
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise NavitError(f"{root}: folders {unknown[:3]} are not classes of this checkpoint {names[:6]}")
    paths, labels = [], []
    for f in folders:
        for p in sorted((base / f).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
                paths.append(p)
                labels.append(names.index(f))
    if not paths:
        raise NavitError(f"{root}: no images in class folders (expected ROOT/<class>/<image>)")
    return paths, labels


def _decode(path: Path) -> np.ndarray | str:
    """Upright RGB (H, W, 3) uint8 with the packer's decoder, or why it cannot be evaluated (the
    packer's rejection reason: 'decompression bomb: ...', 'corrupt or truncated image: ...')."""
    from packer.build import decode
    from packer.config import DecodeConfig

    try:
        img, _ = decode.decode_rgb(decode.read_bytes(str(path)), None, DecodeConfig())
    except decode.DecodeError as e:
        return e.reason
    return np.asarray(img, dtype=np.uint8)


def _resize(img: np.ndarray, gh: int, gw: int, patch: int) -> np.ndarray:
    from PIL import Image

    from packer.build import decode

    return decode.resize_exact(Image.fromarray(img), gw * patch, gh * patch)


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    resolution: str  # "64", "native", or "pack"
    images: int
    top1: float
    top5: float
    tokens_per_image: float
    skipped: int = 0  # files not evaluated (each in ``rejected``)
    loss: float = math.nan  # mean cross-entropy per labelled image
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}, per file

    def to_dict(self) -> dict[str, Any]:
        """The numbers (the rejected files are the same at every resolution: listed once, apart)."""
        return {k: v for k, v in self.__dict__.items() if k != "rejected"}


class _Accumulator:
    def __init__(self) -> None:
        self.n = self.top1 = self.top5 = self.tokens = 0
        self.loss = 0.0

    def add(self, net: torch.nn.Module, rows: Rows, device: torch.device) -> None:
        self.add_batch(net, collate_rows(rows), device)

    @torch.no_grad()
    def add_batch(self, net: torch.nn.Module, hb: HostBatch, device: torch.device) -> None:
        batch = hb.to(device, host_layout=True)
        labels = batch.pop("labels")
        logits = net(batch).logits.float()  # (N, C)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (N, k)
        ok = labels >= 0
        self.top1 += int(((top[:, 0] == labels) & ok).sum())
        self.top5 += int(((top == labels[:, None]).any(-1) & ok).sum())
        self.n += int(ok.sum())
        self.loss += float(F.cross_entropy(logits[ok], labels[ok], reduction="sum"))
        self.tokens += hb.real_tokens

    def result(self, res: str, skipped: int = 0) -> EvalResult:
        n = max(self.n, 1)
        loss = self.loss / self.n if self.n else math.nan
        return EvalResult(res, self.n, self.top1 / n, self.top5 / n, self.tokens / n, skipped, loss)


def load_model(
    checkpoint: str | Path, device: torch.device, *, ema: bool = False, attention: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a checkpoint (or a run's newest one), in eval mode on ``device``, and its meta.
    ``ema``: its EMA weights (``ema.safetensors``) instead; ``attention``: another backend."""
    import dataclasses

    from model import NaViT, NaViTConfig
    from trainer.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    mcfg = NaViTConfig.from_dict(ck.meta["model_config"])
    if attention is not None:
        from model.attention import resolve_backend

        try:
            mcfg = dataclasses.replace(mcfg, attention=attention)
            resolve_backend(attention, torch.device(device))  # e.g. varlen without CUDA
        except ValueError as e:
            raise NavitError(f"model.attention: {e}") from None
    net = NaViT(mcfg)
    weights = ck.weights
    if ema:
        weights = ck.extra_weights("ema")
        if weights is None:
            raise NavitError(f"--ema: {ck.path} holds no EMA weights (trained without ema_decay)")
    net.load_state_dict(weights)
    return net.to(device).eval(), {**ck.meta, "path": str(ck.path)}


def parse_resolutions(spec: str) -> list[int | Square | None]:
    """'64,128,native,sq64' → [64, 128, None, Square(64)]."""
    out: list[int | Square | None] = []
    for part in spec.split(","):
        part = part.strip().lower()
        if part == "native":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        elif part.startswith("sq") and part[2:].isdigit() and int(part[2:]) > 0:
            out.append(Square(int(part[2:])))
        else:
            raise NavitError(
                f"--resolutions: {part!r} is not a positive integer, 'native' or sqN (squashed to N x N)"
            )
    if not out:
        raise NavitError("--resolutions: give at least one resolution")
    return out


def _batched(rows: Rows, batch_rows: int) -> Iterator[Rows]:
    for s in range(0, len(rows), batch_rows):
        sl = slice(s, s + batch_rows)
        yield Rows(
            rows.patches[sl],
            rows.segment_ids[sl],
            rows.pos_h[sl],
            rows.pos_w[sl],
            rows.labels[sl],
            rows.grid_h[sl],
            rows.grid_w[sl],
        )


def iter_folder_chunks(
    root: str | Path,
    class_names: list[str] | None = None,
    chunk_images: int = 256,
    rejected: list[dict[str, str]] | None = None,
) -> Iterator[tuple[list[tuple[np.ndarray, int]], int]]:
    """An ImageFolder decoded ``chunk_images`` at a time: (decoded (image, label) pairs, number of
    undecodable files) per chunk. ``rejected`` gets each undecodable file's {"path", "reason"}.
    WebDataset tar shards and Parquet image files are read by trainer.eval_sources."""
    from trainer.eval_sources import is_container_source, iter_container_chunks

    if is_container_source(root):
        yield from iter_container_chunks(root, class_names, chunk_images, rejected)
        return
    paths, labels = list_image_folder(root, class_names)
    for start in range(0, len(paths), chunk_images):
        sl = slice(start, start + chunk_images)
        good, bad = [], 0
        for p, lab in zip(paths[sl], labels[sl], strict=True):
            img = _decode(p)
            if isinstance(img, str):
                bad += 1
                if rejected is not None:
                    rejected.append({"path": str(p), "reason": img})
            else:
                good.append((img, lab))
        yield good, bad


def rows_at(good: list[tuple[np.ndarray, int]], res: int | Square | None, patch: int, seq_len: int) -> Rows:
    """Decoded images resized for one eval resolution and packed next-fit, in order."""
    if isinstance(res, Square):
        grids = [square_grid(res.side, patch, seq_len)] * len(good)
    else:
        grids = [target_grid(*img.shape[:2], res, patch, seq_len) for img, _ in good]
    imgs = [_resize(img, *g, patch) for (img, _), g in zip(good, grids, strict=True)]
    return packed_to_rows(pack_rows(imgs, [lab for _, lab in good], patch, seq_len))


def evaluate_folder(
    net: torch.nn.Module,
    root: str | Path,
    resolutions: list[int | Square | None],
    *,
    patch: int,
    seq_len: int,
    device: torch.device,
    class_names: list[str] | None = None,
    batch_rows: int = 8,
    chunk_images: int = 256,
) -> list[EvalResult]:
    """Accuracy on an ImageFolder at each resolution; images decoded once per chunk. A file that
    cannot be decoded is rejected with the packer's reason (each result's ``rejected``); NavitError
    if none can be."""
    accs = [_Accumulator() for _ in resolutions]
    rejected: list[dict[str, str]] = []
    evaluable = 0
    for good, _bad in iter_folder_chunks(root, class_names, chunk_images, rejected):
        evaluable += len(good)
        for acc, res in zip(accs, resolutions, strict=True):
            if good:
                for rows in _batched(rows_at(good, res, patch, seq_len), batch_rows):
                    acc.add(net, rows, device)
    if not evaluable:
        raise NavitError(
            f"{root}: none of the {len(rejected)} images could be evaluated ({rejection_summary(rejected)})"
        )
    results = [
        acc.result("native" if r is None else str(r), len(rejected))
        for acc, r in zip(accs, resolutions, strict=True)
    ]
    for r in results:
        r.rejected = rejected
    return results


def rejection_summary(rejected: list[dict[str, str]]) -> str:
    """'2 corrupt or truncated image, 1 decompression bomb': counts by the reason's kind (the text
    before its first colon), most frequent first."""
    from collections import Counter

    kinds = Counter(r["reason"].split(":", 1)[0] for r in rejected)
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


def iter_pack_rows(data_dir: str, batch_rows: int, verify: bool = True) -> Iterator[Rows]:
    """A pack directory's rows of pack epoch 0, as packed, ``batch_rows`` at a time (within a row group)."""
    from trainer.shards import open_shard_set

    shards = open_shard_set(data_dir, verify=verify)
    limits = schema.RowLimits.from_index(shards.index)
    for s, f in enumerate(shards.files):
        if shards.shard_epoch[s] != 0:
            continue
        try:  # page CRC32s are checked as each row group is read
            for table in schema.iter_row_groups(data_dir, f):
                schema.check_rows(table, limits, f"{data_dir}/{f}")
                yield from _batched(Rows.from_arrow(table), batch_rows)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{data_dir}/{f}: unreadable ({str(e).strip().splitlines()[0]})") from None


def evaluate_shards(
    net: torch.nn.Module, data_dir: str, *, device: torch.device, batch_rows: int = 8
) -> list[EvalResult]:
    """Accuracy on a pack directory's rows as packed (pack epoch 0)."""
    acc = _Accumulator()
    for rows in iter_pack_rows(data_dir, batch_rows):
        acc.add(net, rows, device)
    return [acc.result("pack")]


def format_table(results: list[EvalResult]) -> str:
    lines = [f"{'resolution':>10}  {'images':>7}  {'tokens/img':>10}  {'top-1':>7}  {'top-5':>7}"]
    for r in results:
        lines.append(
            f"{r.resolution:>10}  {r.images:>7}  {r.tokens_per_image:>10.1f}  {r.top1:>7.2%}  {r.top5:>7.2%}"
        )
    return "\n".join(lines)


def plot_results(results: list[EvalResult], path: str | Path, title: str = "") -> None:
    """Accuracy against resolution (matplotlib, Agg backend), written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.resolution for r in results]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(xs, [100 * r.top1 for r in results], marker="o", label="top-1")
    ax.plot(xs, [100 * r.top5 for r in results], marker="s", label="top-5")
    ax.set_xlabel("resolution (longer side, px)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    schema.atomic_write_bytes(*schema.resolve_fs(str(path)), buf.getvalue())
