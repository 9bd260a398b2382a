"""``RUN/rejected.jsonl`` of live mode (``navit train --images``): every input the live pipeline could
not pack, with its reason, as ``navit pack`` lists them in a pack's ``rejected.jsonl``.

One JSON object per line, ``{"path": ..., "reason": ..., "epoch": E}``, for each epoch the pipeline
planned or built: images refused at plan time (unreadable header, decompression bomb, ...) and
images whose pixels turned out corrupt while their shard was built. Lines are appended as the
pipeline finds them (from the producer thread), in a file that exists once the first epoch streams
(empty: nothing rejected); a resumed run re-plans and rebuilds the same shards,
and does not repeat a line already in the file. Under DDP, rank 0 lists the plan's rejections and
every rank the pack-time ones of the shards it builds (appends of one short line each)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

FILE = "rejected.jsonl"


class RejectedLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0  # lines this process wrote
        self._seen: set[tuple[int, str]] = set()
        self._mu = threading.Lock()
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                rec = json.loads(line)
                self._seen.add((int(rec["epoch"]), str(rec["path"])))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill: the rejection is written again

    def add(self, epoch: int, path: str, reason: str) -> None:
        from packer.plan.sources import printable

        path, reason = printable(path), printable(reason)
        with self._mu:
            if (epoch, path) in self._seen:
                return
            self._seen.add((epoch, path))
            with open(self.path, "a") as f:
                f.write(json.dumps({"path": path, "reason": reason, "epoch": epoch}) + "\n")
            self.count += 1

    def add_plan(self, plan: Any, epoch: int) -> None:
        """The plan's rejections (inputs refused before any pixel was decoded)."""
        self.path.touch()  # the list exists once streaming starts, even when it stays empty (as a pack's)
        for r in plan.rejected:
            self.add(epoch, r.path, r.reason)

    def add_shard(self, plan: Any, epoch: int, rejections: list[list[Any]]) -> None:
        """A built shard's rejections: [image_id, reason] pairs, named by the plan's paths."""
        if not rejections:
            return
        where = {int(iid): i for i, iid in enumerate(plan.image_id)}
        for image_id, reason in rejections:
            i = where.get(int(image_id))
            self.add(epoch, plan.path[i] if i is not None else f"image id {image_id}", str(reason))
