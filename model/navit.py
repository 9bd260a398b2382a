"""NaViT: a Vision Transformer over packed rows of native-resolution images (arXiv 2307.06304).

Owns the model: :class:`NaViTConfig` (presets, JSON round-trip) and :class:`NaViT`.

Forward, for a batch of ``B`` rows of ``L`` tokens holding ``N`` images (``T`` real tokens)::

    patches (B, L, p*p*C) uint8 ── normalise (pixel mean/std) ──> Linear ──> + φx(rx) + φy(ry)
        └─> depth × pre-norm block [x + Attn(LN x) ; x + MLP(LN x)]   attention within each image
        └─> LN ──> per-image pooling (attention probe, or mean) ──> (N, D) embeddings ──> head (N, C)

Which tokens the trunk runs on depends on the attention backend (see ``model/attention.py``):
the real tokens only, (T, D), for ``segment``/``varlen``; whole rows, (B, L, D), for
``dense``/``flex``. Outputs are in image order: row-major, then segment id.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from model.attention import BACKENDS, Layout, build_layout, resolve_backend
from model.posemb import POSEMB_KINDS, FactorizedPosEmb
from model.posemb_table import TablePosEmb

POSEMB_ALL = (*POSEMB_KINDS, "table2d")  # table2d: model/posemb_table.py

INITS = ("trunc_normal", "xavier", "torch")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (dim, depth, heads) of ViT-Ti/S/B/L; all use mlp_ratio 4.
_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"dim": 192, "depth": 12, "heads": 3},
    "small": {"dim": 384, "depth": 12, "heads": 6},
    "base": {"dim": 768, "depth": 12, "heads": 12},
    "large": {"dim": 1024, "depth": 24, "heads": 16},
}


@dataclass
class NaViTConfig:
    """Every knob of the model; ``NaViTConfig.preset(name, **overrides)`` for the standard sizes.

    Defaults that learn fast (issue 11, measured by benchmarks/bench_learning.py against a plain
    PyTorch ViT, docs/model.md): Glorot-uniform linears, position tables initialised at std 0.5 and
    mean pooling. With the old ones (trunc-normal 0.02 everywhere, attention pool) the model learned
    at a third of the reference's speed: AdamW moves a weight by about ``lr`` per step, so a position
    table that starts at 0.02, beside patch embeddings of order 1, takes hundreds of steps before
    the trunk can tell where a patch is."""

    patch_size: int = 16
    channels: int = 3
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = no classifier (out.logits is None)
    posemb: str = "learned"  # learned | sincos | fourier | absolute | table2d (a ViT's 2-D table)
    posemb_buckets: int = 64  # fractional-coordinate buckets per axis ('learned')
    posemb_std: float = 0.5  # init std of each axis' table ('learned', 'absolute')
    max_grid: int = 64  # reference grid size ('sincos', 'fourier') / table size ('absolute', 'table2d')
    qk_norm: bool = False  # LayerNorm on per-head queries and keys
    pool: str = "mean"  # mean | attn (one learned probe per image)
    fc_norm: bool = False  # final LayerNorm on the pooled embedding instead of every token (timm 'avg')
    patch_norm: bool = False  # LayerNorm over each patch's p*p*C normalised pixels before the embedding
    init: str = "xavier"  # linear layers: xavier (Glorot uniform) | trunc_normal (std 0.02) | torch
    attention: str = "auto"  # auto | dense | segment | flex | varlen
    segment_buckets: int = 2  # segment backend: pad lengths to s steps/octave (0 = exact lengths)
    dropout: float = 0.0  # after attention/MLP projections
    drop_path: float = 0.0  # stochastic depth, max rate (linearly increasing with depth), per image
    grad_checkpoint: bool = False  # training: keep only block inputs, recompute each block in backward
    norm_eps: float = 1e-6
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN  # in [0, 1] units, one per channel
    pixel_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        self._check_types()
        self.pixel_mean = tuple(float(x) for x in self.pixel_mean)
        self.pixel_std = tuple(float(x) for x in self.pixel_std)
        checks = [
            (self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}"),
            (self.channels >= 1, f"channels must be >= 1, got {self.channels}"),
            (self.dim >= 1, f"dim must be >= 1, got {self.dim}"),
            (self.depth >= 0, f"depth must be >= 0, got {self.depth}"),
            (self.heads >= 1, f"heads must be >= 1, got {self.heads}"),
            (
                self.heads < 1 or self.dim % self.heads == 0,
                f"dim {self.dim} is not divisible by heads {self.heads}",
            ),
            (self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}"),
            (self.posemb in POSEMB_ALL, f"posemb must be one of {POSEMB_ALL}, got {self.posemb!r}"),
            (self.posemb_buckets >= 1 and self.max_grid >= 1, "posemb_buckets and max_grid must be >= 1"),
            (self.posemb_std >= 0, f"posemb_std must be >= 0, got {self.posemb_std}"),
            (
                self.posemb not in ("sincos", "fourier") or self.dim % 4 == 0,
                f"posemb={self.posemb!r} needs dim divisible by 4, got {self.dim}",
            ),
            (self.pool in ("attn", "mean"), f"pool must be 'attn' or 'mean', got {self.pool!r}"),
            (self.init in INITS, f"init must be one of {INITS}, got {self.init!r}"),
            (self.attention in BACKENDS, f"attention must be one of {BACKENDS}, got {self.attention!r}"),
            (self.segment_buckets >= 0, f"segment_buckets must be >= 0, got {self.segment_buckets}"),
            (0 <= self.dropout < 1 and 0 <= self.drop_path < 1, "dropout and drop_path must be in [0, 1)"),
            (
                len(self.pixel_mean) == len(self.pixel_std) == self.channels,
                f"pixel_mean/pixel_std need {self.channels} values",
            ),
            (all(s > 0 for s in self.pixel_std), "pixel_std must be > 0"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def _check_types(self) -> None:
        """Each field holds its annotated type and floats are finite, else ValueError naming the
        field: a YAML slip such as ``{dim: nan}`` (the string 'nan') must not reach the arithmetic."""
        import numbers

        def number(x: Any) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if kind == "bool":
                ok, want = isinstance(v, bool), "true or false"
            elif kind == "int":
                ok, want = isinstance(v, numbers.Integral) and not isinstance(v, bool), "a whole number"
            elif kind == "float":
                ok, want = number(v), "a finite number"
            elif kind == "str":
                ok, want = isinstance(v, str), "a string"
            elif kind.startswith("tuple"):
                ok, want = isinstance(v, (list, tuple)) and all(map(number, v)), "a list of finite numbers"
            else:
                continue
            if not ok:
                raise ValueError(f"{f.name} must be {want} (got {v!r})")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> NaViTConfig:
        """``tiny`` / ``small`` / ``base`` / ``large`` (ViT-Ti/S/B/L) with any field overridden;
        fields not given take today's defaults."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(_PRESETS)}")
        fields = {**_PRESETS[name], **overrides}
        cls._check_known(fields)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NaViTConfig:
        """The config a stored dict (a checkpoint's ``model_config``) describes. A field the dict
        lacks was written before that field existed, so it takes the value that reproduces the old
        behaviour (:data:`LEGACY_DEFAULTS`), not today's default."""
        cls._check_known(d)
        return cls(**{**LEGACY_DEFAULTS, **d})

    @classmethod
    def _check_known(cls, d: dict[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown NaViTConfig field(s) {unknown}; known: {sorted(known)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels


# Values that reproduce the model as it was before a field existed (or before its default changed):
# from_dict fills them in for stored configs that lack the field, so old checkpoints keep loading
# with their old behaviour. Every new field, and every field whose default changes, gets an entry.
LEGACY_DEFAULTS: dict[str, Any] = {
    "patch_norm": False,  # added in issue 11
    "init": "trunc_normal",  # added in issue 11
    "posemb_std": 0.02,  # added in issue 11
    "pool": "attn",  # default changed to "mean" in issue 11
    "grad_checkpoint": False,  # added in issue 19 (a memory knob: the function is the same)
    "fc_norm": False,  # added in issue 18
}


@dataclass
class NaViTOutput:
    """Per-image outputs in image order (row-major, then segment id)."""

    embeddings: torch.Tensor  # (N, D) pooled image embeddings
    logits: torch.Tensor | None  # (N, num_classes), None when num_classes == 0
    image_rows: torch.Tensor  # (N,) row of each image
    image_segments: torch.Tensor  # (N,) segment id of each image


# ------------------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head self-attention restricted to each image by the forward's :class:`Layout`."""

    def __init__(self, cfg: NaViTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        # x: (T, D) or (B, L, D) → qkv (..., 3, H, d)
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim))
        q, k, v = qkv.unbind(-3)  # each (..., H, d)
        q, k = self.q_norm(q), self.k_norm(k)
        o = layout.attend(q, k, v)  # (..., H, d)
        return self.proj_drop(self.proj(o.flatten(-2)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block; ``keep`` scales each residual branch per token (stochastic
    depth, drawn per image so an image's tokens are dropped together)."""

    def __init__(self, cfg: NaViTConfig, drop_path: float) -> None:
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, hidden, cfg.dropout)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, layout: Layout, image_ids: torch.Tensor | None) -> torch.Tensor:
        a = self.attn(self.norm1(x), layout)
        if self.training and self.drop_path > 0 and image_ids is not None:
            a = a * _keep_scale(image_ids, layout.num_images, self.drop_path, x)
        x = x + a
        m = self.mlp(self.norm2(x))
        if self.training and self.drop_path > 0 and image_ids is not None:
            m = m * _keep_scale(image_ids, layout.num_images, self.drop_path, x)
        return x + m


def _keep_scale(image_ids: torch.Tensor, n: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """(..., 1) per-token scale 0 or 1/(1-p), one draw per image; ``image_ids`` uses ``n`` for padding."""
    keep = (torch.rand(n + 1, device=like.device) >= p).to(like.dtype) / (1 - p)  # (N+1,)
    return keep[image_ids].unsqueeze(-1)


class AttentionPool(nn.Module):
    """Multi-head attention pooling: one learned probe per image attends to that image's tokens
    only (a segment softmax over real tokens), then an MLP residual (as big_vision's MAP head)."""

    def __init__(self, cfg: NaViTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.probe = nn.Parameter(torch.empty(1, cfg.dim))
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x: torch.Tensor, image_of_token: torch.Tensor, n: int) -> torch.Tensor:
        # x: (T, D) real tokens; image_of_token: (T,) in [0, n)
        t, d = x.shape
        h, hd = self.heads, self.head_dim
        q = self.q_norm(self.q(self.probe).view(h, hd))  # (H, d)
        k, v = self.kv(x).view(t, 2, h, hd).unbind(1)  # (T, H, d) each
        s = (self.k_norm(k) * q).sum(-1) * (1.0 / math.sqrt(hd))  # (T, H)
        idx = image_of_token[:, None].expand(t, h)  # (T, H)
        # Softmax within each image; the max only stabilises, so it carries no gradient.
        smax = s.new_full((n, h), float("-inf")).scatter_reduce(0, idx, s.detach(), "amax")  # (N, H)
        e = (s - smax[image_of_token]).exp()  # (T, H)
        z = s.new_zeros(n, h).index_add(0, image_of_token, e)  # (N, H)
        w = e / z[image_of_token]  # (T, H)
        o = x.new_zeros(n, h, hd).index_add(0, image_of_token, w[..., None] * v)  # (N, H, d)
        o = self.proj(o.reshape(n, d))  # (N, D)
        return o + self.mlp(self.norm(o))


# ------------------------------------------------------------------------------------- model


class NaViT(nn.Module):
    """``net(batch) -> NaViTOutput``; ``batch`` is the dict built by :func:`model.pack_images` or
    the trainer's loader (extra keys such as ``labels`` are ignored). ``patches`` may also be a
    float tensor in the same 0..255 pixel scale (e.g. to take gradients with respect to pixels).
    ``segment_ids_host`` (optional): the segment ids as a numpy array on the host, so the layout
    needs no device→host copy (the trainer passes it on CUDA)."""

    def __init__(self, cfg: NaViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mean = torch.tensor(cfg.pixel_mean).repeat(cfg.patch_size * cfg.patch_size) * 255.0  # (p*p*C,)
        std = torch.tensor(cfg.pixel_std).repeat(cfg.patch_size * cfg.patch_size) * 255.0
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_inv_std", 1.0 / std, persistent=False)
        self.patch_norm = nn.LayerNorm(cfg.patch_dim, eps=cfg.norm_eps) if cfg.patch_norm else None
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.dim)
        self.pos_embed: nn.Module
        if cfg.posemb == "table2d":
            self.pos_embed = TablePosEmb(cfg.dim, cfg.max_grid, init_std=cfg.posemb_std)
        else:
            self.pos_embed = FactorizedPosEmb(
                cfg.posemb, cfg.dim, cfg.posemb_buckets, cfg.max_grid, init_std=cfg.posemb_std
            )
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.pool = AttentionPool(cfg) if cfg.pool == "attn" else None
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else None
        if cfg.init != "torch":
            self.apply(_init_xavier if cfg.init == "xavier" else _init_weights)
        if self.pool is not None:
            nn.init.normal_(self.pool.probe, std=0.02)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu") -> NaViT:
        """The model of a ``navit export`` folder (config.json + model.safetensors), in eval mode;
        plain torch + safetensors (model/pretrained.py). ``net.class_names``: the export's, or None."""
        from model.pretrained import load_pretrained

        return load_pretrained(path, device)

    def layout(self, segment_ids: torch.Tensor, host: Any = None) -> Layout:
        """The per-forward token layout for the configured backend on this device (``host``: the
        same ids as a numpy array, which spares a device→host copy; see build_layout)."""
        backend = resolve_backend(self.cfg.attention, segment_ids.device)
        return build_layout(segment_ids, backend, self.cfg.segment_buckets, host=host)

    def forward(self, batch: dict[str, torch.Tensor]) -> NaViTOutput:
        patches = batch["patches"]  # (B, L, P) uint8 or float pixels
        pos_hw, grid_hw = batch["pos_hw"], batch["grid_hw"]  # (B, L, 2)
        lay = self.layout(batch["segment_ids"], batch.get("segment_ids_host"))
        b, length = lay.batch, lay.seq_len
        if lay.packed:  # trunk on real tokens only: padding is never even read
            patches = patches.reshape(b * length, -1).index_select(0, lay.token_index)  # (T, P)
            pos_hw = pos_hw.reshape(b * length, 2).index_select(0, lay.token_index)  # (T, 2)
            grid_hw = grid_hw.reshape(b * length, 2).index_select(0, lay.token_index)
            image_ids = lay.image_of_token  # (T,)
        else:
            image_ids = None
            if self.training and self.cfg.drop_path > 0:  # (B*L,) image id per slot, N on padding
                image_ids = torch.full((b * length,), lay.num_images, device=patches.device)
                image_ids[lay.token_index] = lay.image_of_token
                image_ids = image_ids.view(b, length)
        x = (patches.float() - self.pixel_mean) * self.pixel_inv_std  # (..., P) normalised
        if self.patch_norm is not None:
            x = self.patch_norm(x)
        x = self.patch_embed(x) + self.pos_embed(pos_hw, grid_hw)  # (T, D) or (B, L, D)
        recompute = self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if recompute:
                # Non-reentrant checkpoint: the block's activations are recomputed in the backward
                # (with the same RNG state, so dropout / drop-path masks repeat): equal gradients.
                x = torch.utils.checkpoint.checkpoint(blk, x, lay, image_ids, use_reentrant=False)
            else:
                x = blk(x, lay, image_ids)
        if not lay.packed:
            x = x.reshape(b * length, -1).index_select(0, lay.token_index)  # (T, D) real tokens
        if not self.cfg.fc_norm:
            x = self.norm(x)
        n = lay.num_images
        if self.pool is not None:
            emb = self.pool(x, lay.image_of_token, n)  # (N, D)
        else:
            # non-blocking: a blocking host→device copy waits for the GPU (a sync per forward)
            counts = torch.from_numpy(lay.lengths).to(x.device, non_blocking=True).to(x.dtype)[:, None]
            emb = x.new_zeros(n, x.shape[-1]).index_add(0, lay.image_of_token, x) / counts
        if self.cfg.fc_norm:
            emb = self.norm(emb)
        logits = self.head(emb) if self.head is not None else None
        return NaViTOutput(emb, logits, lay.image_rows, lay.image_segments)


def _init_weights(m: nn.Module) -> None:
    # ViT recipe: truncated-normal linears, zero biases; LayerNorm stays (1, 0).
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _init_xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
