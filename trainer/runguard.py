"""What surrounds a training run in its ``--out`` folder (:func:`guarded`, the decorator of
``trainer.loop.train``):

- **one run per folder**: an exclusive lock on ``--out`` (:mod:`packer.dirlock` via
  :func:`trainer.rundir.run_lock`, taken by rank 0),
  so a second ``navit train`` on the same folder is refused at once, in one line naming the holder.
  A lock left by a dead process is not held (the kernel drops it): the next run just starts.
- **temp files of a killed or failed run** (``checkpoints/.tmp-step-*``, ``.metrics.jsonl.tmp-*``,
  ``.summary.json.tmp-*``) are removed under the lock at the start, and again when a run fails.
- **a full disk** anywhere in the run (metrics, checkpoint, summary) is one line naming ``--out`` and
  the last good checkpoint (:class:`trainer.diskfull.DiskFullError`), never a traceback.
- **SIGTERM / SIGINT**: :class:`trainer.signals.GracefulStop` is installed for the whole run
  (:func:`current` hands it to the loop); before the first step a signal stops at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from packer.errors import NavitError
from trainer import checkpoint as ckpt
from trainer.diskfull import DiskFullError, is_disk_full
from trainer.rundir import clean_stale_temp, is_rank0, run_lock
from trainer.signals import GracefulStop, StopNow, stopped

_current: list[GracefulStop] = []


def current() -> GracefulStop:
    """The GracefulStop of the run in progress (a fresh, uninstalled one outside a guarded run)."""
    return _current[-1] if _current else GracefulStop()


def _newest(run: Path) -> Path | None:
    found = ckpt.list_checkpoints(run)
    return found[-1] if found else None


@contextlib.contextmanager
def guarded_run(run: Path) -> Iterator[GracefulStop]:
    """Lock, clean, stop on signals, and turn a full disk into one line; see the module docstring."""
    rank0 = is_rank0()
    stop = GracefulStop(cut_waits=int(os.environ.get("WORLD_SIZE", "1")) <= 1)
    with run_lock(run):
        if rank0:
            clean_stale_temp(run)
        _current.append(stop)
        stop.install()
        try:
            yield stop
        except StopNow as e:  # before the first step, or a second signal: no checkpoint written now
            raise stopped(e.signum, None, None, _newest(run), second=e.second) from None
        except Exception as e:
            if rank0:
                clean_stale_temp(run)
            if is_disk_full(e) and not isinstance(e, NavitError):
                last = _newest(run)
                kept = f"last good checkpoint: {last}" if last else "no checkpoint was saved"
                raise DiskFullError(
                    f"--out {run}: no space left on device; {kept}; free space, then continue with --resume"
                ) from None
            raise
        finally:
            stop.restore()
            _current.remove(stop)


def guarded(check: Callable[[Path, bool], None]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of ``train(cfg, source, out, *, resume=...)``: ``check(run, resume)`` first (refuse a
    bad --out before anything is created), then the run inside :func:`guarded_run`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(cfg: Any, source: Any, out: str | Path, *a: Any, resume: bool = False, **kw: Any) -> Any:
            run = Path(out)
            check(run, resume)
            with guarded_run(run):
                return fn(cfg, source, out, *a, resume=resume, **kw)

        return wrapper

    return deco
