"""Opening a batch source for the trainer (:func:`open_source`, the one place to add a new kind), and
:func:`iter_batches` for users who bring their own training loop.

``--data`` picks the source: a pack directory or s3:// / gs:// URI → :class:`trainer.shards.ShardSource`;
``flight://HOST:PORT`` → a :class:`trainer.streams.RecordBatchSource` over a Flight server. Live mode
(``--images``) is :func:`trainer.streams.live_source`. Every source yields the batch format of
:mod:`trainer.batch` with the same position semantics, so a checkpoint resumes any of them exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from packer.errors import ConfigError
from trainer.batch import BatchSource, DataPosition
from trainer.shards import ShardSource, open_shard_set
from trainer.streams import _flight_source


def open_source(
    data: str,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    shuffle_buffer: int = 256,
    prefetch: int = 2,
    pin_memory: bool = False,
    verify: bool = True,
    token: str | None = None,
) -> BatchSource:
    """``--data`` value → a BatchSource. The one place to add a new kind of source.

    A directory or s3:// / gs:// URI → :class:`ShardSource`; ``flight://HOST:PORT`` → a
    :class:`RecordBatchSource` over :func:`trainer.flight_client.flight_batches`."""
    scheme = data.partition("://")[0] if "://" in data else ""
    if scheme.startswith(("flight", "grpc")):
        return _flight_source(data, batch_size, rank, world_size, prefetch, pin_memory, token)
    if scheme not in ("", "file", "s3", "gs", "gcs", "hdfs"):
        raise ConfigError(
            f"--data {data!r}: unknown scheme {scheme!r} (a directory, s3://, gs:// or flight://)"
        )
    shards = open_shard_set(data, verify=verify)
    return ShardSource(
        shards, batch_size, seed, rank, world_size, workers, shuffle_buffer, prefetch, pin_memory
    )


# ----------------------------------------------------------------------------------------------------
# A small client API for users who bring their own training loop
# ----------------------------------------------------------------------------------------------------


def iter_batches(
    data_dir: str,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    start: DataPosition = DataPosition(),
    device: str | torch.device | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], DataPosition]]:
    """Endless ``(batch dict, position after it)`` from a pack directory, on ``device`` if given.

    ``for batch, pos in iter_batches("packed/", 8): out = net(batch); ...`` — save ``pos.to_dict()``
    with your checkpoint and pass ``start=DataPosition.from_dict(...)`` to continue exactly."""
    dev = torch.device(device) if device is not None else None
    src = open_source(
        data_dir,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        workers=workers,
        pin_memory=dev is not None and dev.type == "cuda",
    )
    for hb in src.batches(start):
        yield (hb.to(dev) if dev is not None else hb.tensors), hb.position
