"""Held-out evaluation during training (``navit train --val DATA``) and the best checkpoint.

Every ``eval_every`` steps and at the end of the run, the model (and its EMA, when on) is evaluated on
DATA — a pack directory (its pack-epoch-0 rows as packed, like ``navit eval PACK``) or a labelled
image folder (decoded once, resized to ``eval_resolution`` exactly as ``navit eval`` does, kept in
memory) — with the code of ``navit eval`` (:mod:`trainer.evaluate`) and the same batches, so the
numbers logged during training are the ones ``navit eval`` prints for that checkpoint (tested).

A new best held-out top-1 (of the model's own weights; ties keep the earlier step) is saved as
``RUN/checkpoints/best`` (a full checkpoint, EMA included, with the evaluation in its meta.json).
Every DDP rank evaluates the whole set (the weights are identical on every rank), so every rank knows
whether a best checkpoint is due, without a collective.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from packer import schema
from packer.errors import NavitError
from trainer.batch import HostBatch, collate_rows
from trainer.checkpoint import BEST, CKPT_DIR
from trainer.evaluate import (
    EvalResult,
    _Accumulator,
    _batched,
    iter_folder_chunks,
    iter_pack_rows,
    parse_resolutions,
    rows_at,
)
from trainer.rundir import atomic_write_text

REJECTED_FILE = "val_rejected.jsonl"  # RUN/…: the --val folder's files that could not be scored
BATCH_ROWS = 8  # navit eval's default --batch-rows: the same batches give the same numbers


def is_pack(spec: str) -> bool:
    return "://" in spec or (Path(spec) / schema.INDEX_FILE).is_file()


def check_val_spec(spec: str) -> None:
    """One-line refusal of a ``--val`` that is neither a pack nor a folder (before training starts)."""
    if not is_pack(spec) and not Path(spec).is_dir():
        raise NavitError(f"--val {spec}: not a pack directory (no {schema.INDEX_FILE}) nor an image folder")


class Validator:
    """A held-out set, opened once; :meth:`evaluate` scores a model on it."""

    def __init__(
        self,
        spec: str,
        *,
        patch_size: int,
        seq_len: int,
        num_classes: int,
        class_names: list[str] | None,
        resolution: str = "native",
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self.spec, self.batch_rows = spec, batch_rows
        self.skipped = 0
        self.rejected: list[dict[str, str]] = []  # a folder's files that cannot be scored, with reasons
        self._cached: list[HostBatch] | None = None
        if is_pack(spec):
            from trainer.shards import open_shard_set

            shards = open_shard_set(spec, verify=True)  # once; later passes read without re-hashing
            if shards.patch_size != patch_size:
                raise NavitError(
                    f"--val {spec}: patch size {shards.patch_size}, the training data's is {patch_size}"
                )
            n_val_classes = shards.num_classes
            self.resolution = "pack"
        else:
            (res,) = parse_resolutions(resolution)
            self.resolution = "native" if res is None else str(res)
            self._cached = []
            labels_max = -1
            for good, bad in iter_folder_chunks(spec, class_names, rejected=self.rejected):
                self.skipped += bad
                labels_max = max([labels_max, *(lab for _, lab in good)])
                for rows in _batched(rows_at(good, res, patch_size, seq_len), batch_rows):
                    self._cached.append(collate_rows(rows))
            n_val_classes = labels_max + 1
        if n_val_classes > num_classes:
            raise NavitError(
                f"--val {spec}: labels up to {n_val_classes - 1}, but the model has {num_classes} classes"
            )

    def _batches(self) -> Any:
        if self._cached is not None:
            return iter(self._cached)
        return (collate_rows(r) for r in iter_pack_rows(self.spec, self.batch_rows, verify=False))

    def evaluate(self, net: torch.nn.Module, device: torch.device) -> EvalResult:
        """Top-1/top-5/loss of ``net`` (in eval mode, no grad; its mode is restored)."""
        was_training = net.training
        net.eval()
        acc = _Accumulator()
        try:
            for hb in self._batches():
                acc.add_batch(net, hb, device)
        finally:
            net.train(was_training)
        return acc.result(self.resolution, self.skipped)


@dataclass
class BestSoFar:
    """The best held-out top-1 of a run so far (read from ``checkpoints/best`` on resume)."""

    top1: float = -math.inf
    step: int | None = None

    @classmethod
    def of_run(cls, run: Path) -> BestSoFar:
        try:
            meta = json.loads((run / CKPT_DIR / BEST / "meta.json").read_text())
            return cls(float(meta["val"]["top1"]), int(meta["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def improves(self, top1: float) -> bool:
        return top1 > self.top1


def val_record(step: int, res: EvalResult, ema: EvalResult | None, best: BestSoFar) -> dict[str, Any]:
    """The metrics.jsonl record of one held-out evaluation."""
    rec: dict[str, Any] = {
        "event": "val",
        "step": step,
        "val_top1": res.top1,
        "val_top5": res.top5,
        "val_loss": res.loss,
        "val_images": res.images,
        "val_resolution": res.resolution,
        "val_skipped": res.skipped,  # files of the folder not scored (each in RUN/val_rejected.jsonl)
    }
    if ema is not None:
        rec.update({"ema_val_top1": ema.top1, "ema_val_top5": ema.top5, "ema_val_loss": ema.loss})
    rec.update({"best_val_top1": best.top1, "best_step": best.step})
    return rec


def val_line(rec: dict[str, Any], total: int) -> str:
    """The console line of one held-out evaluation."""
    line = (
        f"val  {rec['step']:>6}/{total}  top-1 {rec['val_top1']:.3f}  top-5 {rec['val_top5']:.3f}  "
        f"loss {rec['val_loss']:.4f}  ({rec['val_images']} images, {rec['val_resolution']}"
        + (f"; {rec['val_skipped']} not scored, see {REJECTED_FILE})" if rec["val_skipped"] else ")")
    )
    if "ema_val_top1" in rec:
        line += f"  EMA top-1 {rec['ema_val_top1']:.3f} loss {rec['ema_val_loss']:.4f}"
    return line + f"  best {rec['best_val_top1']:.3f} @ step {rec['best_step']}"


class Validation:
    """``--val`` during a run: the held-out set, the best so far, and one evaluation's effects."""

    def __init__(
        self,
        spec: str,
        *,
        cfg: Any,
        source: Any,
        num_classes: int,
        class_names: list[str] | None,
        run: Path,
        resume: bool,
    ) -> None:
        self.spec, self.every, self.total = spec, cfg.eval_every, cfg.schedule.steps
        self.validator = Validator(
            spec,
            patch_size=source.patch_size,
            seq_len=source.seq_len,
            num_classes=num_classes,
            class_names=class_names,
            resolution=cfg.eval_resolution,
        )
        self.best = BestSoFar.of_run(run) if resume else BestSoFar()
        # Every held-out file is scored or listed with its reason (an empty list: none refused).
        lines = "".join(json.dumps(r) + "\n" for r in self.validator.rejected)
        atomic_write_text(run / REJECTED_FILE, lines)

    def describe(self) -> str:
        when = f"every {self.every} steps and at the end" if self.every else "at the end"
        refused = len(self.validator.rejected)
        listed = f"; {refused} files not scored, listed in {REJECTED_FILE}" if refused else ""
        return f"validation: {self.spec} ({self.validator.resolution}), {when}{listed}"

    def due(self, step: int, end: int) -> bool:
        return step == end or bool(self.every and step % self.every == 0)

    def run(
        self,
        step: int,
        model: torch.nn.Module,
        ema: torch.nn.Module | None,
        device: torch.device,
        log: Any,
        save_best: Any,
    ) -> None:
        """Evaluate the model (and the EMA), log it, and on a new best call ``save_best(step, meta)``
        on every rank (the checkpoint save gathers the ranks' data positions)."""
        res = self.validator.evaluate(model, device)
        ema_res = self.validator.evaluate(ema, device) if ema is not None else None
        new_best = self.best.improves(res.top1)
        if new_best:
            self.best = BestSoFar(res.top1, step)
        rec = val_record(step, res, ema_res, self.best)
        log.record(rec, val_line(rec, self.total))
        if new_best:
            val = {"top1": res.top1, "top5": res.top5, "loss": res.loss, "images": res.images}
            save_best(step, {"val": {**val, "source": self.spec, "resolution": res.resolution}})
