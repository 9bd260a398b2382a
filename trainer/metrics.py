"""Training metrics: a line on the console, ``RUN/metrics.jsonl``, and the optional sinks of
``--log`` (TensorBoard, W&B: trainer/loggers.py). On a terminal a rich progress bar runs under the lines.

The loop reports per-step counts; this module turns them into rates over the logging window: loss,
accuracy, images/s, tokens/s (real tokens), padding fraction seen and the data-wait fraction (time
the loop spent waiting for a batch, over the window's wall time).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss_sum: float = 0.0  # sum of per-step mean losses
    correct: int = 0
    labeled: int = 0
    images: int = 0
    real_tokens: int = 0
    tokens: int = 0
    data_wait_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)


class MetricsLogger:
    """Aggregates steps and writes one record every ``log_every`` steps (rank 0 only writes).

    ``console``: print the lines (off: metrics.jsonl and the sinks only); ``sinks``: objects with
    ``log(record)`` and ``close()`` (trainer/loggers.py) that get every record."""

    def __init__(
        self,
        run_dir: str | Path | None,
        total_steps: int,
        log_every: int = 10,
        enabled: bool = True,
        stream: TextIO | None = None,
        resume_step: int | None = None,
        console: bool = True,
        sinks: list[Any] | None = None,
    ) -> None:
        """``resume_step``: the step the run starts from (its checkpoint's, or 0 for a fresh start in
        an existing run folder); records of later steps (written before an interruption, and about
        to be written again) are dropped first."""
        self.total, self.log_every, self.enabled = total_steps, log_every, enabled
        self.stream = stream or sys.stderr
        self.console = enabled and console
        self.window = Window()
        self.jsonl = None
        self.sinks: list[Any] = list(sinks or []) if enabled else []
        self.last: dict[str, Any] = {}
        self._bar: Any = None
        if enabled and run_dir is not None:
            run = Path(run_dir)
            run.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                rewind_metrics(run, resume_step)
            self.jsonl = open(run / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if self.console and self.stream.isatty():
            self._start_bar(resume_step or 0)

    def _start_bar(self, done: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  ETA"),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=True,
        )
        self._task = self._bar.add_task("train", total=self.total, completed=done)
        self._bar.start()

    def step(
        self,
        step: int,
        loss: float,
        correct: int,
        labeled: int,
        images: int,
        real_tokens: int,
        tokens: int,
        data_wait_s: float,
        lr: float,
        grad_norm: float,
    ) -> dict[str, Any] | None:
        w = self.window
        w.steps += 1
        w.loss_sum += loss
        w.correct += correct
        w.labeled += labeled
        w.images += images
        w.real_tokens += real_tokens
        w.tokens += tokens
        w.data_wait_s += data_wait_s
        if step % self.log_every and step != self.total:
            return None
        now = time.perf_counter()
        dt = max(now - w.start, 1e-9)
        rec = {
            "step": step,
            "loss": w.loss_sum / w.steps,
            "acc": w.correct / w.labeled if w.labeled else math.nan,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": w.images / dt,
            "tokens_per_s": w.real_tokens / dt,
            "padding_fraction": 1.0 - w.real_tokens / w.tokens if w.tokens else 0.0,
            "data_wait_fraction": w.data_wait_s / dt,
            "window_steps": w.steps,
            "window_s": dt,
            "time": time.time(),
        }
        self.last = rec
        self.window = Window()
        if self.enabled:
            self._write(rec)
            self.message(
                f"step {rec['step']:>6}/{self.total}  loss {rec['loss']:.4f}  acc {rec['acc']:.3f}  "
                f"lr {rec['lr']:.2e}  {rec['images_per_s']:.1f} img/s  {rec['tokens_per_s']:.0f} tok/s  "
                f"pad {rec['padding_fraction']:.1%}  data-wait {rec['data_wait_fraction']:.1%}"
            )
            if self._bar is not None:
                self._bar.update(self._task, completed=step)
        return rec

    def record(self, rec: dict[str, Any], line: str | None = None) -> None:
        """Another record with a ``step`` (a held-out evaluation): metrics.jsonl, the sinks, a line."""
        if self.enabled:
            self._write(rec)
            if line is not None:
                self.message(line)

    def _write(self, rec: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(rec) + "\n")
        for sink in self.sinks:
            sink.log(rec)

    def event(self, record: dict[str, Any]) -> None:
        """A non-step record (start, resume, checkpoint, summary) in metrics.jsonl."""
        if self.enabled and self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")

    def message(self, text: str) -> None:
        if not self.console:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def rewind_metrics(run_dir: str | Path, step: int) -> int:
    """Drop from ``RUN/metrics.jsonl`` every record of a step after ``step`` and any line that is not
    JSON (a line cut short when the process was killed); returns how many lines were dropped.

    A resumed run restarts at its checkpoint's step and logs the steps after it again, so without
    this a kill between two checkpoints leaves those steps twice. The file is rewritten atomically
    (temp file + rename): a second kill leaves either the old or the new file, never a mix."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        at = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(at, int) and at > step:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: leave the old file, and no temp file
            raise
    return dropped
