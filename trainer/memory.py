"""A training step's memory, estimated before anything is allocated, against the memory available.

The estimate is a floor, not a forecast: it counts what a step cannot do without and leaves out
allocator slack, attention scores and temporaries, so a run it lets through may still be tight, but
a run it refuses could not have fit. Per process:

- **model + optimizer**: 16 bytes per parameter (fp32 weights, gradients, AdamW's two moments);
- **activations** kept for the backward: ``ACT_FLOATS`` floats per token, per block, per channel,
  for ``batch_size * seq_len`` tokens (4-byte floats on CPU, 2-byte under CUDA's bf16 autocast).
  Measured on CPU for the tiny and small presets by benchmarks/bench_step_memory.py (peak RSS
  growth of one forward+backward, minus the gradients): 16.5-20.4 floats per token-block-channel
  (docs/train.md); 16 is the floor;
- **host batches**: the uint8 patches and int32 layout of ``grad_accum`` micro-batches plus two in
  flight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ACT_FLOATS = 16
PARAM_BYTES = 16  # weights + grads + AdamW exp_avg + exp_avg_sq, fp32


@dataclass(frozen=True)
class StepMemory:
    """Estimated bytes of one training step, per process."""

    params: int
    activations: int
    batches: int

    @property
    def total(self) -> int:
        return self.params + self.activations + self.batches


def estimate_step(
    n_params: int,
    depth: int,
    dim: int,
    patch_dim: int,
    batch_size: int,
    seq_len: int,
    grad_accum: int,
    act_bytes: int = 4,
    grad_checkpoint: bool = False,
) -> StepMemory:
    """The floor described in the module docstring."""
    tokens = batch_size * seq_len
    # Per token on the host: patches (uint8) + segment id, 2 positions, 2 grid sides (int32).
    host = tokens * (patch_dim + 5 * 4) * (grad_accum + 2)
    floats = depth + ACT_FLOATS if grad_checkpoint else depth * ACT_FLOATS  # per token and channel
    return StepMemory(n_params * PARAM_BYTES, tokens * dim * floats * act_bytes, host)


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still use: free memory of its CUDA device, or on CPU the smaller of
    the kernel's MemAvailable and the cgroup's remaining limit, shared by the processes of this
    host (``LOCAL_WORLD_SIZE`` under torchrun). None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    limits = [x for x in (_system_available(), _cgroup_available()) if x is not None]
    if not limits:
        return None
    return min(limits) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _system_available() -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable), via psutil."""
    import psutil

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def check_memory(
    cfg: Any,
    num_classes: int,
    source: Any,
    device: torch.device,
    info: Any,
    build_model: Any,
    stored: dict[str, Any] | None = None,
) -> None:
    """Refuse (one line, on every rank) a step whose memory floor exceeds what this process has:
    before the model, the optimizer or any batch is allocated. ``build_model``: trainer.loop's;
    ``stored``: the model config it is given (a resumed run's, or --init-from's)."""
    from packer.errors import ConfigError
    from trainer.distributed import all_reduce_sum

    with torch.device("meta"):  # shapes only: no memory, no RNG draws
        shell, mcfg = build_model(cfg, num_classes, source.patch_size, stored)
    est = estimate_step(
        sum(p.numel() for p in shell.parameters()),
        mcfg.depth,
        mcfg.dim,
        mcfg.patch_dim,
        cfg.data.batch_size,
        source.seq_len,
        cfg.data.grad_accum,
        act_bytes=2 if device.type == "cuda" else 4,
        grad_checkpoint=mcfg.grad_checkpoint,
    )
    avail = available_bytes(device)
    short = avail is not None and est.total > avail
    (flag,) = all_reduce_sum([float(short)], info, device)
    if flag:
        have = f"{gib(avail)} is available" if short else "another process lacks it"
        raise ConfigError(
            f"--batch-size {cfg.data.batch_size} x seq_len {source.seq_len} needs at least "
            f"{gib(est.total)} per process on {device.type} (model+optimizer {gib(est.params)}, "
            f"activations {gib(est.activations)}, batches {gib(est.batches)}) but {have}: lower "
            "--batch-size (--grad-accum keeps the step size)"
        )


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
