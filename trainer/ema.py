"""Exponential moving average of the weights (``ema_decay`` > 0; off by default).

After every optimizer step ``ema ← ema + (1 − d)·(w − ema)`` for each parameter, with
``d = min(ema_decay, (1 + t) / (10 + t))`` at step ``t`` (the usual warm-up of the decay, as in
TensorFlow's ExponentialMovingAverage ``num_updates``): early in a run, when the weights move fast, the
average follows them instead of staying near the random init. Buffers are copied as they are.

The average is a whole eval-mode copy of the model (``ModelEMA.module``), so validation runs it like
the model itself; checkpoints save it as ``ema.safetensors`` beside ``model.safetensors`` and a resumed
run reloads it, so the EMA after a resume is bit for bit the uninterrupted run's (on CPU; tested).
``navit eval --ema`` evaluates it.
"""

from __future__ import annotations

import copy

import torch


class ModelEMA:
    """The EMA of ``model``'s parameters (fp32, same device), updated by :meth:`update`."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step ``step`` (1 for the first step)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        ema = list(self.module.parameters())
        src = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, src, weight)  # one fused op per device/dtype group, no host sync
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(weights)
