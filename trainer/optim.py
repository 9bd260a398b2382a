"""The optimizer and schedule of a run: AdamW (no weight decay on 1-D parameters), linear warmup then
cosine to ``min_lr_ratio`` of the peak lr, and the global gradient norm when it is not clipped."""

from __future__ import annotations

import math
from typing import Any

import torch

from trainer.config import TrainConfig


def lr_lambda(cfg: TrainConfig) -> Any:
    """Multiplier of the peak lr at step s: linear warmup to 1, then cosine to min_lr_ratio."""
    steps, warm, floor = cfg.schedule.steps, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        t = min(1.0, (s - warm) / max(1, steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: no decay on biases, norms, embeddings' 1-D params (the usual
    ViT recipe)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple[Any, Any]:
    """AdamW over ``model``'s trainable parameters and its warmup + cosine LambdaLR."""
    opt = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """Global L2 norm of the gradients (a device tensor: no host sync)."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
