"""timm ``VisionTransformer`` state dicts → NaViT weights and config (``navit train --init-from``).

Pure torch: timm itself is not needed to convert (only to make the weights). The name map, for the
standard ViT blocks (``timm/models/vision_transformer.py``)::

    timm                                   navit
    patch_embed.proj.weight (D, C, p, p)   patch_embed.weight (D, p·p·C): permuted to (row, col, channel)
    patch_embed.proj.bias                  patch_embed.bias (zeros if absent)
    pos_embed (1, prefix + G·G, D)         pos_embed.table (G·G, D), posemb="table2d", max_grid=G
                                           (class/register rows dropped; resampled per image grid)
    blocks.i.norm1 / norm2                 blocks.i.norm1 / norm2
    blocks.i.attn.qkv (+ q_bias, v_bias)   blocks.i.attn.qkv (bias zeros if absent)
    blocks.i.attn.q_norm / k_norm          blocks.i.attn.q_norm / k_norm (qk_norm=True)
    blocks.i.attn.proj · ls1.gamma         blocks.i.attn.proj (LayerScale folded into the weights)
    blocks.i.mlp.fc1 / fc2 · ls2.gamma     blocks.i.mlp.fc1 / fc2 (LayerScale folded)
    norm                                   norm (per token; global_pool token/avg without fc_norm, map)
    fc_norm                                norm with fc_norm=True (global_pool='avg': norm after pooling)
    attn_pool.latent (1, 1, D)             pool.probe (1, D), pool="attn" (MAP head, global_pool='map')
    attn_pool.{q,kv,q_norm,k_norm,proj,norm,mlp.fc1,mlp.fc2}   pool.{same}
    head                                   head (num_classes = its rows; absent → 0)

Exact for ViTs without prefix tokens (``class_token=False``, no registers) and global pooling
``avg`` (with or without fc_norm) or ``map``: e.g. ``vit_*_patch16_siglip_*``,
``vit_*_patch16_siglip_gap_*``, ``vit_*_patch16_gap_*``, ``vit_medium_patch16_gap_256``. A class
token or registers are dropped with a note (navit pools image tokens only): the trunk's weights are
reused but the features differ until fine-tuned. Refused with one line: pre-norm (CLIP-style
``norm_pre``), a norm inside the patch embedding or the MLP, SwiGLU MLPs, rotary/relative position
schemes, an attention pool with its own position table, and any key not in the map above.

``heads`` cannot be read from weights: it comes from the caller, else the ViT family's width table
(:data:`HEADS_BY_DIM`), else ``dim // 64``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

# Heads of the standard timm/big_vision ViT widths (Ti, S, M, B, L, So400m, H, g).
HEADS_BY_DIM = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


class TimmConvertError(ValueError):
    """A state dict that does not map onto NaViT; the message is one line."""


@dataclass
class Converted:
    model_config: dict[str, Any]  # NaViTConfig fields
    weights: dict[str, torch.Tensor]  # NaViT state dict
    notes: list[str] = field(default_factory=list)  # what changed (dropped class token, ...)


def looks_like_timm_vit(state: dict[str, Any]) -> bool:
    return "patch_embed.proj.weight" in _strip_prefix(state)


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def convert_timm_vit(
    state: dict[str, torch.Tensor],
    *,
    heads: int | None = None,
    pixel_mean: tuple[float, ...] | None = None,
    pixel_std: tuple[float, ...] | None = None,
    norm_eps: float = 1e-6,
) -> Converted:
    """Convert a timm ViT state dict (see the module docstring). TimmConvertError on anything
    the map does not cover."""
    sd = {k: v.detach().float() for k, v in _strip_prefix(dict(state)).items()}
    used: set[str] = set()
    notes: list[str] = []

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            near = sorted(k for k in set(sd) - used if k.startswith(key.rsplit(".", 2)[0]))[:3]
            raise TimmConvertError(f"timm key {key} missing (found {near}): not a standard ViT layout")
        used.add(key)
        return sd[key]

    def opt(key: str) -> torch.Tensor | None:
        return take(key) if key in sd else None

    if "patch_embed.proj.weight" not in sd:
        raise TimmConvertError("not a timm ViT state dict (no patch_embed.proj.weight)")
    for bad, what in (
        ("norm_pre.weight", "pre-norm (CLIP-style norm_pre)"),
        ("patch_embed.norm.weight", "a norm inside the patch embedding"),
        ("attn_pool.pos_embed", "an attention pool with its own position table"),
    ):
        if bad in sd:
            raise TimmConvertError(f"timm key {bad}: {what} is not supported by navit")
    conv = take("patch_embed.proj.weight")  # (D, C, p, p)
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise TimmConvertError(f"patch_embed.proj.weight has shape {tuple(conv.shape)}, not (D, C, p, p)")
    dim, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    out: dict[str, torch.Tensor] = {
        "patch_embed.weight": conv.permute(0, 2, 3, 1).reshape(dim, patch * patch * channels),
        "patch_embed.bias": _or_zeros(opt("patch_embed.proj.bias"), dim),
    }

    # Position table: drop the class/register rows, keep the square image grid.
    prefix = 0
    if "cls_token" in sd:
        take("cls_token")
        prefix += 1
        notes.append("class token dropped (navit pools image tokens): features differ until fine-tuned")
    if "reg_token" in sd:
        prefix += take("reg_token").shape[1]
        notes.append("register tokens dropped: features differ until fine-tuned")
    if "pos_embed" not in sd:
        raise TimmConvertError("no pos_embed: ViTs without an absolute position table are not supported")
    pos = take("pos_embed").reshape(-1, dim)  # (prefix? + G·G, D)
    grid = math.isqrt(pos.shape[0])
    if grid * grid != pos.shape[0]:  # the table holds rows for the prefix tokens too
        grid = math.isqrt(pos.shape[0] - prefix)
        if prefix == 0 or grid * grid != pos.shape[0] - prefix:
            raise TimmConvertError(
                f"pos_embed has {pos.shape[0]} rows: not a square grid (+ {prefix} prefix)"
            )
        pos = pos[prefix:]
    out["pos_embed.table"] = pos.contiguous()

    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)
    hidden = take("blocks.0.mlp.fc1.weight").shape[0] if depth else 4 * dim
    qk_norm = "blocks.0.attn.q_norm.weight" in sd
    for i in range(depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            out[b + n + ".weight"], out[b + n + ".bias"] = take(b + n + ".weight"), take(b + n + ".bias")
        out[b + "attn.qkv.weight"] = take(b + "attn.qkv.weight")
        qkv_bias = opt(b + "attn.qkv.bias")
        if qkv_bias is None and b + "attn.q_bias" in sd:  # BEiT-style: q and v biases, no k bias
            q_b, v_b = take(b + "attn.q_bias"), take(b + "attn.v_bias")
            qkv_bias = torch.cat([q_b, torch.zeros_like(q_b), v_b])
        out[b + "attn.qkv.bias"] = _or_zeros(qkv_bias, 3 * dim)
        if qk_norm:
            for n in ("q_norm", "k_norm"):
                out[f"{b}attn.{n}.weight"] = take(f"{b}attn.{n}.weight")
                out[f"{b}attn.{n}.bias"] = take(f"{b}attn.{n}.bias")
        ls1, ls2 = opt(b + "ls1.gamma"), opt(b + "ls2.gamma")
        _linear(out, b + "attn.proj", take(b + "attn.proj.weight"), opt(b + "attn.proj.bias"), ls1)
        _linear(out, b + "mlp.fc1", take(b + "mlp.fc1.weight"), opt(b + "mlp.fc1.bias"), None)
        _linear(out, b + "mlp.fc2", take(b + "mlp.fc2.weight"), opt(b + "mlp.fc2.bias"), ls2)

    fc_norm = "fc_norm.weight" in sd
    norm_key = "fc_norm" if fc_norm else "norm"
    if fc_norm and "norm.weight" in sd:
        raise TimmConvertError("both norm and fc_norm: a ViT with two final norms is not supported")
    if norm_key + ".weight" not in sd:
        raise TimmConvertError("no final norm (norm or fc_norm): final_norm=False ViTs are not supported")
    out["norm.weight"], out["norm.bias"] = take(norm_key + ".weight"), take(norm_key + ".bias")

    pool = "mean"
    if "attn_pool.latent" in sd:
        pool = "attn"
        latent = take("attn_pool.latent")
        if latent.shape[1] != 1:
            raise TimmConvertError(f"attn_pool.latent has {latent.shape[1]} queries; navit's pool has one")
        out["pool.probe"] = latent.reshape(1, dim)
        for n in ("q", "kv", "proj", "mlp.fc1", "mlp.fc2"):
            _linear(out, f"pool.{n}", take(f"attn_pool.{n}.weight"), opt(f"attn_pool.{n}.bias"), None)
        if qk_norm != ("attn_pool.q_norm.weight" in sd):
            raise TimmConvertError(
                "attn_pool and blocks disagree on q/k norms (navit's pool follows qk_norm)"
            )
        for n in ("norm", "q_norm", "k_norm") if qk_norm else ("norm",):
            out[f"pool.{n}.weight"] = take(f"attn_pool.{n}.weight")
            out[f"pool.{n}.bias"] = take(f"attn_pool.{n}.bias")
    elif "cls_token" in sd:
        notes.append(
            "global_pool 'token' becomes mean pooling: the head sees other features until fine-tuned"
        )

    num_classes = 0
    if "head.weight" in sd:
        w = take("head.weight")
        if w.shape[0] > 0:
            num_classes = w.shape[0]
            out["head.weight"], out["head.bias"] = w, _or_zeros(opt("head.bias"), w.shape[0])
        else:
            opt("head.bias")

    unknown = sorted(set(sd) - used)
    if unknown:
        more = f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else ""
        raise TimmConvertError(f"unknown timm keys {unknown[:4]}{more}: not a standard ViT layout")
    if heads is None:
        heads = HEADS_BY_DIM.get(dim, max(1, dim // 64))
        notes.append(
            f"heads={heads} assumed for width {dim} (set model.overrides.heads if the model differs)"
        )
    if dim % heads:
        raise TimmConvertError(f"width {dim} is not divisible by heads={heads}")
    model_config = {
        "patch_size": patch,
        "channels": channels,
        "dim": dim,
        "depth": depth,
        "heads": heads,
        "mlp_ratio": hidden / dim,
        "num_classes": num_classes,
        "posemb": "table2d",
        "max_grid": grid,
        "posemb_std": 0.02,
        "qk_norm": qk_norm,
        "pool": pool,
        "fc_norm": fc_norm,
        "patch_norm": False,
        "norm_eps": norm_eps,
        "pixel_mean": list(pixel_mean or IMAGENET_MEAN),
        "pixel_std": list(pixel_std or IMAGENET_STD),
    }
    return Converted(model_config, out, notes)


def _or_zeros(t: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.zeros(n) if t is None else t


def _linear(
    out: dict[str, torch.Tensor],
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> None:
    """A Linear's weight and bias (zeros if absent), with a LayerScale ``gamma`` folded in:
    ``gamma * (W x + b) = (gamma[:, None] * W) x + gamma * b``."""
    bias = _or_zeros(bias, weight.shape[0])
    if scale is not None:
        weight, bias = weight * scale[:, None], bias * scale
    out[name + ".weight"], out[name + ".bias"] = weight, bias
