"""Which checkpoint ``--resume`` continues from, verified; ``--resume-from`` to choose an older one.

``--resume`` takes the newest complete checkpoint and verifies its files against the digests in its
meta.json. A damaged one (a truncated ``state.pt``, a flipped byte in ``model.safetensors``) is named
in one line, with the previous checkpoint to resume from instead::

    error: --resume: checkpoint step-00000006 is damaged (RUN/checkpoints/step-00000006/state.pt: 1000
    bytes, expected 5817 (truncated or overwritten)); resume from the previous one with
    --resume-from step-00000003

``--resume-from step-00000003`` (or ``3``, or ``previous`` = the one before the newest) continues
from that checkpoint. The checkpoints after it belong to the abandoned continuation: they are set
aside as ``checkpoints/discarded-step-NNNNNNNN`` (never listed, resumed from or deleted by navit;
remove them when you no longer need them), so that the newest checkpoint is again the run's own.
"""

from __future__ import annotations

from pathlib import Path

from packer.errors import NavitError
from trainer import checkpoint as ckpt


def pick(run_dir: Path, choice: str | None) -> Path:
    """The checkpoint directory to resume from: the newest, or ``choice`` (step-N, N, previous)."""
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise NavitError(f"--resume: {run_dir} has no checkpoint to resume from")
    if choice is None:
        return found[-1]
    if choice == "previous":
        if len(found) < 2:
            raise NavitError(f"--resume-from previous: {run_dir} has only one checkpoint ({found[0].name})")
        return found[-2]
    name = Path(choice).name
    digits = name.removeprefix("step-")
    if digits.isdigit():
        for p in found:
            if int(p.name.removeprefix("step-")) == int(digits):
                return p
    names = ", ".join(p.name for p in found)
    raise NavitError(f"--resume-from {choice}: no such checkpoint in {run_dir} (it has {names})")


def load_for_resume(run_dir: Path, choice: str | None) -> ckpt.Checkpoint:
    """Load (and verify, weights and training state) the checkpoint to resume from; a damaged one is
    one line naming it and the previous checkpoint to use instead."""
    target = pick(run_dir, choice)
    try:
        ckpt.verify_checkpoint(target)  # every file (weights, EMA, state) before anything is built
        state = ckpt.load_checkpoint(target, verified=True)
        state.train_state()  # loadable (without digests: the only check there is)
    except ckpt.CheckpointDamaged as e:
        older = [p for p in ckpt.list_checkpoints(run_dir) if p.name < target.name]
        hint = (
            f"resume from the previous one with --resume-from {older[-1].name}"
            if older
            else "there is no earlier checkpoint: start a new run in another --out"
        )
        raise ckpt.CheckpointDamaged(f"--resume: checkpoint {target.name} is damaged ({e}); {hint}") from None
    return state


def set_aside_newer(run_dir: Path, target: Path) -> list[str]:
    """Rename the checkpoints after ``target`` to ``discarded-step-N`` (see the module docstring);
    returns the new names."""
    moved = []
    for p in ckpt.list_checkpoints(run_dir):
        if p.name <= target.name:
            continue
        dest = p.with_name(ckpt.DISCARDED_PREFIX + p.name)
        n = 1
        while dest.exists():
            n += 1
            dest = p.with_name(f"{ckpt.DISCARDED_PREFIX}{p.name}-{n}")
        p.rename(dest)
        moved.append(dest.name)
    return moved
