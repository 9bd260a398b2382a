"""Training checkpoints: atomic, self-describing, safe to load.

Layout of ``RUN/checkpoints/step-00001000/`` (written as a temp directory, then renamed into place,
so a crash never leaves a half-written checkpoint under a final name)::

    model.safetensors   the model's weights (safetensors: no code runs on load)
    ema.safetensors     the EMA of the weights (only with ``ema_decay`` > 0; trainer/ema.py)
    state.pt            optimizer + scheduler state and RNG states: only tensors and plain Python
                        containers, loaded with torch.load(weights_only=True)
    meta.json           format/version, step, TrainConfig, NaViTConfig, data position per rank,
                        counters (images/tokens seen), class names, last metrics, and the size and
                        sha256 of model.safetensors and state.pt (``files``)

The newest complete checkpoint (one with meta.json) is the one ``--resume`` and ``navit eval
--checkpoint RUN`` pick; only the last ``keep`` are kept. ``RUN/checkpoints/best/`` (with ``--val``)
is the checkpoint of the best held-out top-1 so far, in the same layout; it is never pruned and never
resumed from.

Every load verifies the files against the digests in meta.json (a damaged checkpoint is a one-line
error naming the file); checkpoints written before the digests existed have no ``files`` entry and
load unverified (``Checkpoint.verified`` is False). A disk that fills up while saving leaves no temp
directory behind and gives one line (:class:`trainer.diskfull.DiskFullError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from packer.errors import NavitError
from trainer.diskfull import DiskFullError, is_disk_full, os_errno
from trainer.rundir import CKPT_DIR, TMP_PREFIX

FORMAT = "navit-train-checkpoint"
VERSION = 1
BEST = "best"  # RUN/checkpoints/best: the best held-out top-1 so far (trainer/validate.py)
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
DIGESTED = (MODEL_FILE, STATE_FILE)  # always digested (and extra NAME.safetensors); meta.json holds them
DISCARDED_PREFIX = "discarded-"  # checkpoints set aside by --resume-from (never listed or deleted)
_STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointDamaged(NavitError):
    """A checkpoint file does not match the size/sha256 recorded in its meta.json, or cannot be read."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, meta.json, weights and (lazily) the training state."""

    path: Path
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    verified_files: set[str] = field(default_factory=set)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def verified(self) -> bool:
        """False for a checkpoint written before digests existed (loaded unverified)."""
        return "files" in self.meta

    def extra_weights(self, name: str) -> dict[str, torch.Tensor] | None:
        """``NAME.safetensors`` saved beside the model (e.g. ``ema``), verified, or None if it was not
        saved."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = self.path / f"{name}.safetensors"
        if not f.is_file():
            return None
        if f.name not in self.verified_files:
            verify_file(self.path, self.meta, f.name)
        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointDamaged(f"{f}: cannot load ({e})") from None

    def train_state(self) -> dict[str, Any]:
        """Optimizer/scheduler/RNG state (weights_only: no arbitrary unpickling), verified first."""
        if STATE_FILE not in self.verified_files:
            verify_file(self.path, self.meta, STATE_FILE)
            self.verified_files.add(STATE_FILE)
        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except RuntimeError as e:  # a truncated or otherwise unreadable zip archive (no digests to tell)
            if "weights_only" in str(e) or "Unsupported" in str(e):
                raise  # a pickled object that is not plain data: refused, say so as torch does
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointDamaged(f"{self.path}/{STATE_FILE}: cannot load ({first})") from None


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex} of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def verify_file(ckpt_dir: Path, meta: dict[str, Any], name: str) -> None:
    """Raise CheckpointDamaged (one line) unless ``name`` matches the size and sha256 in ``meta``.
    A checkpoint without digests (written before they existed) is not checked."""
    expected = (meta.get("files") or {}).get(name)
    if expected is None:
        if "files" in meta:
            raise CheckpointDamaged(f"{ckpt_dir}: meta.json has no digest for {name}")
        return
    path = ckpt_dir / name
    try:
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointDamaged(
                f"{path}: {size} bytes, expected {expected.get('bytes')} (truncated or overwritten)"
            )
        actual = file_digest(path)["sha256"]
    except OSError as e:
        raise CheckpointDamaged(f"{path}: cannot read ({os.strerror(e.errno) if e.errno else e})") from None
    if actual != expected.get("sha256"):
        raise CheckpointDamaged(f"{path}: sha256 mismatch (the file changed after it was saved)")


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check meta.json and every digested file of a checkpoint; returns its meta."""
    meta = read_meta(ckpt_dir)
    for name in meta.get("files") or DIGESTED:
        verify_file(ckpt_dir, meta, name)
    return meta


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 3,
    extra: dict[str, torch.nn.Module] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step-XXXXXXXX`` atomically, then delete all but the newest ``keep``.

    ``extra``: more modules whose weights go beside the model as ``NAME.safetensors`` (the EMA);
    ``name``: another directory name than ``step-XXXXXXXX`` (``best``), never counted or pruned."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CKPT_DIR
    final = root / (name or f"step-{step:08d}")
    tmp = root / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        weight_files = []
        for stem, module in {"model": model, **(extra or {})}.items():
            # clone(): safetensors refuses tensors that share storage (e.g. tied weights).
            weights = {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}
            save_file(weights, str(tmp / f"{stem}.safetensors"))
            weight_files.append(f"{stem}.safetensors")
        with open_for_write(tmp / STATE_FILE) as f:
            # Through a Python file object, so that a failed write keeps its OSError (errno) as the
            # context of torch's "unexpected pos" RuntimeError.
            torch.save(train_state, f)
        files = {f_name: file_digest(tmp / f_name) for f_name in (*weight_files, STATE_FILE)}
        full_meta = {"format": FORMAT, "version": VERSION, "step": step, **meta, "files": files}
        with open_for_write(tmp / "meta.json") as f:
            f.write((json.dumps(full_meta, indent=2, sort_keys=True) + "\n").encode())
        for f_name in (*files, "meta.json"):
            with open(tmp / f_name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint filling the disk
        if isinstance(e, Exception) and is_disk_full(e):
            found = list_checkpoints(run_dir)
            last = f"last good checkpoint: {found[-1]}" if found else "no checkpoint was saved before"
            raise DiskFullError(
                f"--out {run_dir}: no space left on device while saving checkpoint {final.name} (the "
                f"partial one was removed); {last}; free space, then continue with --resume"
            ) from None
        code = os_errno(e) if isinstance(e, Exception) else None
        if code is not None:
            why = os.strerror(code)
            raise NavitError(f"--out {run_dir}: cannot save checkpoint {final.name} ({why})") from None
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a RUN directory (→ its newest checkpoint). NavitError if neither."""
    p = Path(path)
    if (p / "meta.json").is_file() and (p / "model.safetensors").is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise NavitError(f"{path}: not a checkpoint directory, and no checkpoints under {p / CKPT_DIR}")


def load_checkpoint(path: str | Path, verified: bool = False) -> Checkpoint:
    """Load meta.json and the weights of a checkpoint (or of a run's newest one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = resolve_checkpoint(path)
    meta = read_meta(p)
    if not verified:  # ``verified``: the caller ran verify_checkpoint on it just now
        verify_file(p, meta, MODEL_FILE)
    try:
        weights = load_file(str(p / MODEL_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointDamaged(f"{p}/{MODEL_FILE}: cannot load ({e})") from None
    return Checkpoint(p, meta, weights, set(meta.get("files") or ()) if verified else {MODEL_FILE})


def read_meta(p: Path) -> dict[str, Any]:
    """meta.json of a checkpoint directory, checked for format and version (one-line errors)."""
    try:
        meta = json.loads((p / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointDamaged(f"{p}/meta.json: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"{p}/meta.json: cannot read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise NavitError(f"{p}: not a navit training checkpoint (format {fmt!r})")
    if meta.get("version") != VERSION:
        raise NavitError(
            f"{p}: checkpoint version {meta.get('version')!r} is not supported (reads {VERSION})"
        )
    return meta


def open_for_write(path: Path) -> Any:
    """The file object every checkpoint file but the weights is written through (tests inject a
    full disk here)."""
    return open(path, "wb")  # noqa: SIM115 - the caller's with-block closes it


def rng_state() -> dict[str, Any]:
    """Every RNG the loop uses (torch CPU, and CUDA when present) as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
