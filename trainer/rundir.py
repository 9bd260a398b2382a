"""The run folder (``navit train --out RUN``) before anything heavy is imported: what makes a folder a
run, the one-run-per-folder lock, temp files of a killed run, atomic small writes. No torch here, so
the CLI refuses a bad or busy ``--out`` within a second, before torch is even imported."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from packer.dirlock import LOCK_NAME, DirLock
from packer.errors import NavitError

CKPT_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"  # a checkpoint being written: checkpoints/.tmp-step-NNNNNNNN-XXXXXXXX/, .tmp-best-X/
RUN_MARKERS = (CKPT_DIR, "metrics.jsonl")  # what makes a folder a navit run (train writes both)


def check_run_dir(run: Path, resume: bool) -> None:
    """Refuse, in one line, an ``--out`` that cannot be a run directory: a file, a path under a file,
    or a non-empty folder that is not a navit run (its files are not ours to mix a run into)."""
    if run.exists() and not run.is_dir():
        raise NavitError(f"--out {run}: is a file, not a directory")
    parent = next((p for p in run.parents if p.exists()), None)
    if not run.exists() and parent is not None and not parent.is_dir():
        raise NavitError(f"--out {run}: {parent} is a file, not a directory")
    ours = run.is_dir() and any((run / m).exists() for m in RUN_MARKERS)
    if run.is_dir() and not resume and not ours and any(p.name != LOCK_NAME for p in run.iterdir()):
        raise NavitError(
            f"--out {run}: a non-empty folder that is not a navit run (no {CKPT_DIR}/ or "
            "metrics.jsonl); choose a new or empty folder"
        )


def is_rank0() -> bool:
    """Rank 0 of a torchrun launch, or a single process (the rank that writes the run folder)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def run_lock(run: Path) -> Any:
    """The --out lock of a training run (a no-op on ranks other than 0, which never write there)."""
    return DirLock(run, flag="--out", what="navit train") if is_rank0() else contextlib.nullcontext()


def clean_stale_temp(run: Path) -> list[str]:
    """Remove the temp files and directories a killed or failed run left in ``run``; their names."""
    removed = []
    root = run / CKPT_DIR
    candidates = list(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    if run.is_dir():
        candidates += [p for p in run.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    for p in candidates:
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p.name)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` via a temp file and a rename: a full disk leaves the old file (or none)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
