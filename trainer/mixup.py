"""Mixup / CutMix for packed batches of variable-size images, at the token level, on the device.

Images in a packed batch have different patch grids (and, with token dropping, different kept
tokens), so the usual "mix the batch with a permutation of itself" does not apply. Following timm's
NaFlex mixup (pairs of images, only their mutual central overlap is mixed, the soft label weighs
each image by the share of itself that was kept), but on tokens instead of pixels:

1. **Pairing.** The labelled images of a micro-batch are sorted by grid aspect ratio, shuffled within
   small windows (``pair_window``) so pairings vary, and neighbours are paired (i <-> j); with an
   odd count one image stays unmixed. Similar shapes mean large overlaps.
2. **Alignment.** Both grids are centred on each other: the overlap is ``min(gh_i, gh_j) x
   min(gw_i, gw_j)`` patches; token (r, c) of image i faces cell ``(r - top_i + top_j, c - left_i +
   left_j)`` of image j. A token of i is mixed only if that cell's token was kept in j (token
   dropping can remove it), so pixels always come from a real token of the partner.
3. **Mixing.** One λ ~ Beta(α, α) per micro-batch. *Mixup* blends every facing token of the overlap:
   ``x_i = λ x_i + (1 - λ) x_j`` (float pixels, 0..255 scale, which the model accepts). *CutMix*
   replaces the tokens of a box of ``round(oh·sqrt(1-λ)) x round(ow·sqrt(1-λ))`` patches at a random
   place inside each image's overlap with the facing tokens of j (whole tokens: stays uint8). Token
   positions (pos_hw) stay image i's: the model sees j's content at i's cells.
4. **Soft labels.** ``λ_i = 1 - (1 - λ) · m_i / n_i`` (mixup) or ``1 - m_i / n_i`` (cutmix), with m_i
   the tokens of i that were mixed and n_i its kept tokens — the share of what the model sees that
   is still image i. Target ``λ_i · onehot(y_i) + (1 - λ_i) · onehot(y_j)``: rows sum to 1.

Every draw (whether to mix, mixup or cutmix, λ, pairing, boxes) comes from a numpy generator seeded
by (seed, step, micro-batch, rank): a resumed run mixes exactly as the uninterrupted one, and the
global torch RNG (dropout) is untouched. Only training uses this; evaluation never mixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixParams:
    """What to do (mirrors ``trainer.config.MixSection``)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    pair_window: int = 4

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass
class Mixed:
    """One mixed micro-batch: ``patches`` to feed the model instead of the batch's (B, L, P) — float
    for mixup, uint8 for cutmix — and per image (N,) ``partner`` (itself when unmixed), ``lam`` (own
    share, 1.0 when unmixed) and soft ``targets`` (N, C) (zero rows for unlabelled images)."""

    patches: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor
    targets: torch.Tensor
    mode: str  # "mixup" | "cutmix"


def image_of_token(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(flat indices of real tokens (T,), their image's output index (T,), number of images N).

    Output order is the model's: row-major, then segment id (segments are 1..k per row)."""
    seg = segment_ids.long()  # (B, L)
    per_row = seg.max(dim=1).values  # (B,) images per row
    offset = torch.cumsum(per_row, 0) - per_row  # (B,) output index of each row's first image
    flat = seg.reshape(-1)
    tok = torch.nonzero(flat > 0).squeeze(1)  # (T,)
    row = tok // seg.shape[1]
    img = offset[row] + flat[tok] - 1
    return tok, img, int(per_row.sum())


def pair_images(
    grid_hw: np.ndarray, eligible: np.ndarray, window: int, rng: np.random.Generator
) -> np.ndarray:
    """partner (N,) int64: neighbours by grid aspect ratio, shuffled within ``window``; unpaired
    (ineligible, or the odd one out) images are their own partner."""
    n = len(grid_hw)
    partner = np.arange(n)
    idx = np.flatnonzero(eligible)
    if len(idx) < 2:
        return partner
    aspect = np.log(grid_hw[idx, 1] / grid_hw[idx, 0])
    order = idx[np.argsort(aspect, kind="stable")]
    if window > 1:
        for s in range(0, len(order), window):
            order[s : s + window] = rng.permutation(order[s : s + window])
    a, b = order[0 : len(order) - 1 : 2], order[1::2]
    partner[a], partner[b] = b, a
    return partner


def mix_batch(
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    params: MixParams,
    rng: np.random.Generator,
) -> Mixed | None:
    """Mix one packed micro-batch (``patches`` (B, L, P), ``segment_ids`` (B, L), ``pos_hw``,
    ``grid_hw`` (B, L, 2)) with its labels (N,) in output order. None when this micro-batch is not
    mixed (probability ``1 - prob``, or fewer than two labelled images)."""
    if not params.enabled or rng.random() >= params.prob:
        return None
    if params.mixup_alpha > 0 and params.cutmix_alpha > 0:
        cutmix = bool(rng.random() < params.switch_prob)
    else:
        cutmix = params.cutmix_alpha > 0
    alpha = params.cutmix_alpha if cutmix else params.mixup_alpha
    lam = float(rng.beta(alpha, alpha))

    patches = batch["patches"]
    b, length, p = patches.shape
    dev = patches.device
    tok, img, n = image_of_token(batch["segment_ids"])
    if n != labels.numel():
        raise ValueError(f"mix_batch: {labels.numel()} labels for {n} images")
    pos = batch["pos_hw"].reshape(-1, 2)[tok].long()  # (T, 2) row, col in the image's grid
    grid_tok = batch["grid_hw"].reshape(-1, 2)[tok].long()  # (T, 2)
    grid = torch.zeros(n, 2, dtype=torch.long, device=dev)
    grid[img] = grid_tok  # (N, 2) every token of an image carries the same grid
    labels_np = labels.detach().cpu().numpy()
    grid_np = grid.cpu().numpy()
    partner_np = pair_images(grid_np, labels_np >= 0, params.pair_window, rng)
    if (partner_np == np.arange(n)).all():
        return None
    partner = torch.as_tensor(partner_np, device=dev)

    # Central overlap of each image with its partner, in patches: (N,) each.
    gh, gw = grid[:, 0], grid[:, 1]
    oh = torch.minimum(gh, gh[partner])
    ow = torch.minimum(gw, gw[partner])
    top, left = (gh - oh) // 2, (gw - ow) // 2
    top_p, left_p = top[partner], left[partner]  # where the overlap starts in the partner
    rr = pos[:, 0] - top[img]  # (T,) token's row / col within its overlap
    cc = pos[:, 1] - left[img]
    paired = partner[img] != img
    select = paired & (rr >= 0) & (rr < oh[img]) & (cc >= 0) & (cc < ow[img])
    if cutmix:
        cut = float(np.sqrt(1.0 - lam))
        oh_np, ow_np = oh.cpu().numpy(), ow.cpu().numpy()
        ch = np.floor(oh_np * cut + 0.5).astype(np.int64)  # (N,) box size in patches
        cw = np.floor(ow_np * cut + 0.5).astype(np.int64)
        y0 = np.floor(rng.random(n) * (oh_np - ch + 1)).astype(np.int64)  # (N,) box place in overlap
        x0 = np.floor(rng.random(n) * (ow_np - cw + 1)).astype(np.int64)
        ch_t, cw_t, y0_t, x0_t = (torch.as_tensor(v, device=dev) for v in (ch, cw, y0, x0))
        ry, rx = rr - y0_t[img], cc - x0_t[img]
        select &= (ry >= 0) & (ry < ch_t[img]) & (rx >= 0) & (rx < cw_t[img])

    # Which token of the partner faces each selected token: a dense (image, cell) → token table.
    cells = gh * gw
    base = torch.cumsum(cells, 0) - cells  # (N,) first cell of each image in the table
    table = torch.full((int(cells.sum()),), -1, dtype=torch.long, device=dev)
    table[base[img] + pos[:, 0] * gw[img] + pos[:, 1]] = torch.arange(len(tok), device=dev)
    j = partner[img]
    src_cell = base[j] + (rr + top_p[img]) * gw[j] + (cc + left_p[img])
    src = torch.where(select, table[src_cell.clamp(0, max(len(table) - 1, 0))], torch.full_like(tok, -1))
    mixed = src >= 0  # (T,) selected and the facing token was kept

    flat = patches.reshape(b * length, p)
    if cutmix:
        out = flat.clone()
        out[tok[mixed]] = flat[tok[src[mixed]]]
    else:
        x = flat[tok].float()  # (T, P)
        blended = lam * x + (1.0 - lam) * x[src.clamp(min=0)]
        out = torch.zeros(b * length, p, dtype=torch.float32, device=dev)
        out[tok] = torch.where(mixed[:, None], blended, x)

    kept = torch.bincount(img, minlength=n).clamp(min=1).double()
    share = torch.bincount(img[mixed], minlength=n).double() / kept  # (N,) share of i that was mixed
    lam_i = (1.0 - share) if cutmix else (1.0 - (1.0 - lam) * share)
    lab = labels.long()
    onehot = F.one_hot(lab.clamp(min=0), num_classes).double()  # (N, C)
    targets = lam_i[:, None] * onehot + (1.0 - lam_i)[:, None] * onehot[partner]
    targets[lab < 0] = 0.0
    return Mixed(
        out.reshape(b, length, p), partner, lam_i.float(), targets.float(), "cutmix" if cutmix else "mixup"
    )


def mix_rng(seed: int, step: int, micro: int, rank: int) -> np.random.Generator:
    """The generator of one micro-batch's mixing draws."""
    return np.random.default_rng([seed & ((1 << 63) - 1), step, micro, rank, 0x4D4958])  # "MIX"


def soft_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None, label_smoothing: float
) -> torch.Tensor:
    """Summed per-image cross-entropy over labelled images: against the hard ``labels`` (N,) when
    ``targets`` is None, else against the soft ``targets`` (N, C) (rows summing to 1)."""
    if targets is None:
        return F.cross_entropy(
            logits, labels, ignore_index=-1, label_smoothing=label_smoothing, reduction="sum"
        )
    keep = labels >= 0
    return F.cross_entropy(logits[keep], targets[keep], label_smoothing=label_smoothing, reduction="sum")
