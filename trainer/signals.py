"""SIGTERM and SIGINT during training: save a checkpoint of the current step, then stop.

Clusters preempt a job with SIGTERM and kill it (SIGKILL) after a grace period (Kubernetes 30 s by
default, Slurm ``KillWait``); Ctrl-C sends SIGINT. While :class:`GracefulStop` is installed (main
thread only; the previous handlers come back afterwards):

- a signal while the loop computes a step or writes a checkpoint sets a flag: the step (or the write)
  finishes, a checkpoint of that step is saved and the run stops. Time to stop: at most one step
  plus one checkpoint write;
- a signal while the loop waits for data stops the wait at once (:class:`StopNow`): the batch being
  fetched belongs to no step yet, so the checkpoint is of the last completed step;
- a second signal stops at once, without saving (a partial checkpoint directory is removed).

The run then raises :class:`packer.errors.Stopped` with one line saying what it did; ``navit train``
prints it and exits 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as schedulers expect.

Under DDP every rank receives the signal (torchrun forwards it); the ranks agree on the step to stop
at with one all-reduce of the flag at the steps that synchronise anyway (every ``log_every`` steps),
and a data wait is not cut short there (the ranks must stop after the same step)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from packer.errors import Stopped

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopNow(BaseException):  # noqa: N818 - a control-flow signal like KeyboardInterrupt, not an error
    """Raised from the signal handler where stopping cannot wait (a data wait, a second signal).
    A BaseException, so that ``except Exception`` in data code does not swallow it."""

    def __init__(self, signum: int, second: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.second = signum, second


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class GracefulStop:
    """Context manager installing the handlers; see the module docstring. ``cut_waits``: whether a
    signal may cut a data wait short (off under DDP)."""

    def __init__(self, cut_waits: bool = True) -> None:
        self.cut_waits = cut_waits
        self.signum: int | None = None
        self._waiting = cut_waits  # until the first step's data arrives, nothing is lost by stopping at once
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def install(self) -> None:
        """(Re)install the handlers: also after a library (Ray) replaced them with its own."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only
        for s in HANDLED:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def restore(self) -> None:
        for s, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise StopNow(signum, second=True)
        self.signum = signum
        if self._waiting:
            raise StopNow(signum)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """The loop waits for data in here: a signal raises StopNow at once (when ``cut_waits``)."""
        if not self.cut_waits:
            yield
            return
        if self.signum is not None:
            raise StopNow(self.signum)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def requested(self, info: Any = None, device: Any = None, collective: bool = True) -> bool:
        """Whether to stop now. Under DDP: whether any rank was signalled (one all-reduce, so every
        rank must call it at the same steps with ``collective`` True); False when not ``collective``."""
        if info is not None and getattr(info, "enabled", False):
            if not collective:
                return False
            from trainer.distributed import all_reduce_sum

            (flag,) = all_reduce_sum([float(self.signum is not None)], info, device)
            if flag and self.signum is None:
                self.signum = signal.SIGTERM  # another rank was signalled: stop with it
            return bool(flag)
        return self.signum is not None


def stopped(
    signum: int, step: int | None, saved: Path | None, last: Path | None, second: bool = False
) -> Stopped:
    """The one line a run stopped by ``signum`` ends with, and its exit code (128 + signum).
    ``step`` None: stopped before the first step."""
    how = "interrupted (SIGINT)" if signum == signal.SIGINT else f"stopped by {signal_name(signum)}"
    kept = f"last checkpoint: {last}" if last else "no checkpoint was saved"
    if second:
        text = f"{how} again before the checkpoint was written: stopped without saving; {kept}"
    elif saved is not None:
        text = f"{how} at step {step}: saved checkpoint {saved}; continue with --resume"
    elif step is None:
        text = f"{how} before the first step: nothing to save; {kept}"
    elif last is not None:
        text = f"{how} at step {step}: no step since checkpoint {last}, nothing to save; --resume goes on"
    else:
        text = f"{how} at step {step}: nothing to save"
    return Stopped(text, 128 + signum)
