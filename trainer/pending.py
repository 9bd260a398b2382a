"""Per-step statistics kept on the device between host syncs.

On a GPU, reading a value back (``.item()``, ``float(t)``) waits until the device has finished every
queued kernel, so a loop that reads its loss each step cannot queue step s+1 while step s runs. The
loop instead appends each step's sums (loss, correct, grad norm; under DDP also the all-reduced
counts) as one small device tensor and reads them all back in **one** copy at the steps that need
host values: log steps, checkpoint and evaluation steps, and the end. A non-finite loss is found there,
at the first sync after it, and named by its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepRecord:
    """One optimizer step's numbers on the host (counts summed over micro-batches and ranks)."""

    step: int
    loss_sum: float
    correct: float
    grad_norm: float
    labeled: float
    images: float
    real_tokens: float
    tokens: float
    data_wait_s: float
    lr: float

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.labeled, 1.0)


class PendingSteps:
    """Steps done since the last sync: device sums + the host numbers known without a sync."""

    def __init__(self) -> None:
        self._device: list[torch.Tensor] = []
        self._host: list[tuple[int, list[float] | None, float, float]] = []

    def __len__(self) -> int:
        return len(self._device)

    def add(
        self,
        step: int,
        sums: torch.Tensor,
        host_counts: list[float] | None,
        data_wait_s: float,
        lr: float,
    ) -> None:
        """``sums``: float64 device vector ``[loss_sum, correct, grad_norm]`` followed by
        ``[labeled, images, real_tokens, tokens]`` when those are only on the device (DDP, all-reduced),
        else those four are ``host_counts``."""
        self._device.append(sums.detach())
        self._host.append((step, host_counts, data_wait_s, lr))

    def flush(self) -> list[StepRecord]:
        """Every pending step, in order, read back in one device→host copy; the list is emptied."""
        if not self._device:
            return []
        values = torch.stack(self._device).tolist()  # the one host sync of the window
        out = []
        for v, (step, counts, wait, lr) in zip(values, self._host, strict=True):
            c = counts if counts is not None else v[3:7]
            out.append(StepRecord(step, v[0], v[1], v[2], *c, data_wait_s=wait, lr=lr))
        self._device, self._host = [], []
        return out
