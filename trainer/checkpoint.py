"""Training checkpoints: atomic, self-describing, safe to load.

Layout of ``RUN/checkpoints/step-00001000/`` (written as a temp directory, then renamed into place,
so a crash never leaves a half-written checkpoint under a final name)::

    model.safetensors   the model's weights (safetensors: no code runs on load)
    ema.safetensors     the EMA of the weights (only with ``ema_decay`` > 0; trainer/ema.py)
    state.pt            optimizer + scheduler state and RNG states: only tensors and plain Python
                        containers, loaded with torch.load(weights_only=True)
    meta.json           format/version, step, TrainConfig, NaViTConfig, data position per rank,
                        counters (images/tokens seen), class names, last metrics

The newest complete checkpoint (one with meta.json) is the one ``--resume`` and ``navit eval
--checkpoint RUN`` pick; only the last ``keep`` are kept. ``RUN/checkpoints/best/`` (with ``--val``)
is the checkpoint of the best held-out top-1 so far, in the same layout; it is never pruned and never
resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from packer.errors import NavitError

FORMAT = "navit-train-checkpoint"
VERSION = 1
CKPT_DIR = "checkpoints"
BEST = "best"  # RUN/checkpoints/best: the best held-out top-1 so far (trainer/validate.py)
_STEP_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, meta.json, weights and (lazily) the training state."""

    path: Path
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def extra_weights(self, name: str) -> dict[str, torch.Tensor] | None:
        """``NAME.safetensors`` saved beside the model (e.g. ``ema``), or None if it was not saved."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = self.path / f"{name}.safetensors"
        if not f.is_file():
            return None
        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise NavitError(f"{f}: cannot load ({e})") from None

    def train_state(self) -> dict[str, Any]:
        """Optimizer/scheduler/RNG state (weights_only: no arbitrary unpickling)."""
        return torch.load(self.path / "state.pt", map_location="cpu", weights_only=True)


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
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"step-{step:08d}")
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    files = ["model.safetensors", "state.pt", "meta.json"]
    for stem, module in {"model": model, **(extra or {})}.items():
        # clone(): safetensors refuses tensors that share storage (e.g. tied weights).
        weights = {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}
        save_file(weights, str(tmp / f"{stem}.safetensors"))
        files += [f"{stem}.safetensors"] if stem != "model" else []
    torch.save(train_state, tmp / "state.pt")
    full_meta = {"format": FORMAT, "version": VERSION, "step": step, **meta}
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
    for f_name in files:
        with open(tmp / f_name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
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


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load meta.json and the weights of a checkpoint (or of a run's newest one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = resolve_checkpoint(path)
    try:
        meta = json.loads((p / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise NavitError(f"{p}/meta.json: not valid JSON ({e.msg})") from None
    if meta.get("format") != FORMAT:
        raise NavitError(f"{p}: not a navit training checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise NavitError(
            f"{p}: checkpoint version {meta.get('version')!r} is not supported (reads {VERSION})"
        )
    try:
        weights = load_file(str(p / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise NavitError(f"{p}/model.safetensors: cannot load ({e})") from None
    return Checkpoint(p, meta, weights)


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
