"""Metric sinks besides the console and ``RUN/metrics.jsonl`` (``--log tensorboard``, ``--log wandb``).

Each sink gets the same records as metrics.jsonl — the step records every ``log_every`` steps (under
``train/``) and the held-out evaluations (under ``val/``, ``val_ema/``) — as scalars at their step.
Both packages are optional: asking for one that is not installed is a one-line error before training.

- **TensorBoard** (``torch.utils.tensorboard``): event files in ``RUN/tb/``; on ``--resume`` the
  events of steps after the checkpoint are hidden (``purge_step``), as metrics.jsonl drops them.
- **Weights & Biases**: ``wandb.init(dir=RUN, resume="allow")`` with a run id kept in
  ``RUN/wandb-id`` so a resumed run continues the same W&B run; ``WANDB_MODE=offline`` (or
  ``disabled``) and ``WANDB_PROJECT`` are honoured as usual (project default: ``navit``).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, Protocol

from packer.errors import ConfigError

SKIP = {"step", "time", "window_steps", "event", "best_step", "val_resolution", "val_skipped"}


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's finite numbers under their sink names: ``train/loss``, ``val/top1``, ``val_ema/top1``."""
    out = {}
    for k, v in record.items():
        if k in SKIP or isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            continue
        if k.startswith("ema_val_"):
            name = f"val_ema/{k[len('ema_val_') :]}"
        elif k.startswith("val_"):
            name = f"val/{k[len('val_') :]}"
        elif k == "best_val_top1":
            name = "val/best_top1"
        else:
            name = f"train/{k}"
        out[name] = float(v)
    return out


class TensorBoardSink:
    def __init__(self, run: Path, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--log tensorboard: the tensorboard package is not installed (pip install tensorboard)"
            ) from None
        # purge_step hides the events of steps after the checkpoint, as rewind_metrics does.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run / "tb"), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        for name, v in scalars(record).items():
            self.writer.add_scalar(name, v, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--log wandb: the wandb package is not installed (pip install wandb)") from None
        import os

        id_file = run / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "navit"),
            name=run.name,
            id=run_id,
            resume="allow",
            dir=str(run),
            config=config,
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def open_sinks(names: list[str], run: Path, resume_step: int | None, config: dict[str, Any]) -> list[Sink]:
    """The sinks named in ``loggers`` (``--log``), for the main process."""
    sinks: list[Sink] = []
    try:
        for name in dict.fromkeys(names):  # each once, in order
            if name == "tensorboard":
                sinks.append(TensorBoardSink(run, resume_step))
            elif name == "wandb":
                sinks.append(WandbSink(run, config))
            else:
                raise ConfigError(f"--log {name}: unknown logger (tensorboard | wandb)")
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks


def check_available(names: list[str]) -> None:
    """Refuse, in one line and before any data is read, a logger whose package is missing."""
    import importlib.util

    for name in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
        if module is None:
            raise ConfigError(f"--log {name}: unknown logger (tensorboard | wandb)")
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--log {name}: the {module} package is not installed (pip install {module})")
