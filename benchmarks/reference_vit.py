"""A plain PyTorch ViT: the yardstick NaViT's learning speed is compared against (not shipped).

Deliberately the most ordinary ViT one can write with stock PyTorch modules, so that "learns as
fast as a plain ViT" means something: square images of one size, ``Linear`` patch embedding of the
flattened p*p*C pixels, a learned absolute position embedding (one vector per patch index), an
``nn.TransformerEncoder`` of pre-norm GELU layers, a final LayerNorm, mean pooling over the patches
and a linear head. Every module keeps PyTorch's default initialisation (``nn.Linear``'s Kaiming-
uniform, LayerNorm (1, 0)); the position table starts at N(0, 0.02) (a parameter has no default;
``pos_std`` changes it, for the ablation that gives the reference NaViT's larger table init).

Input pixels are normalised exactly as NaViT does it (``(x - mean) / std`` in 0..255 units), so the
two models see the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn


class ReferenceViT(nn.Module):
    """``forward(images) -> logits``; ``images`` (B, H, W, C) uint8 or float in 0..255, H = W = image_size."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        pixel_mean: tuple[float, ...] = (0.5,),
        pixel_std: tuple[float, ...] = (0.5,),
        pos_std: float = 0.02,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        # Per-channel constants in 0..255 units, broadcast over (..., p*p*C) in (row, col, channel) order.
        mean = torch.tensor(pixel_mean, dtype=torch.float32).repeat(patch_size * patch_size) * 255.0
        std = torch.tensor(pixel_std, dtype=torch.float32).repeat(patch_size * patch_size) * 255.0
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.patch_embed = nn.Linear(patch_size * patch_size * channels, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * pos_std)  # (1, N, D)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=int(dim * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, N, p*p*C), patches row-major, pixels (row, col, channel) as NaViT's."""
        b, h, w, c = images.shape
        p, g = self.patch_size, self.grid
        x = images.reshape(b, g, p, g, p, c).permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
        return x.reshape(b, g * g, p * p * c)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (self.patchify(images).float() - self.pixel_mean) / self.pixel_std  # (B, N, P)
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        x = self.norm(self.encoder(x))  # (B, N, D)
        return self.head(x.mean(dim=1))  # (B, classes)
