"""2-process DDP on CPU (gloo) matches one process fed the same global batches.


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads that
    # spin-wait for each other make every op many times slower: use one, restore afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

The reference run sees, at step k, rank 0's batch k and rank 1's batch k concatenated (the global
batch); the loss is averaged per image over both, so the two runs compute the same function and
differ only by floating-point reduction order."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from train_fixtures import make_images, tiny_train_config, write_pack

from trainer.batch import DataPosition, HostBatch, Rows
from trainer.shards import ShardSource, open_shard_set

STEPS = 6
PER_RANK = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg():
    return tiny_train_config(**{"schedule.steps": STEPS, "data.batch_size": PER_RANK})


def _ddp_worker(rank: int, pack: str, out: str, port: int) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    from trainer.data import open_source
    from trainer.distributed import DistInfo, shutdown
    from trainer.loop import train

    def make(info):
        return open_source(pack, batch_size=PER_RANK, seed=0, rank=info.rank, world_size=info.world_size)

    res = train(_cfg(), make, out, verbose=False)
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps(res.losses))
    shutdown(DistInfo(rank, 2, rank))


class _GlobalBatches:
    """Single-process source: rank 0's and rank 1's batch k, concatenated."""

    def __init__(self, pack: str) -> None:
        shards = open_shard_set(pack)
        self.ranks = [ShardSource(shards, PER_RANK, seed=0, rank=r, world_size=2) for r in range(2)]
        self.seq_len, self.patch_size = shards.seq_len, shards.patch_size
        self.num_classes, self.description, self.class_names = shards.num_classes, "global", None

    def batches(self, start: DataPosition = DataPosition()):
        for a, b in zip(self.ranks[0].batches(), self.ranks[1].batches(), strict=False):
            t = {k: torch.cat([a.tensors[k], b.tensors[k]]) for k in a.tensors}
            yield HostBatch(
                t, a.position, a.images + b.images, a.real_tokens + b.real_tokens, a.tokens + b.tokens
            )


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    from trainer.loop import train

    images, labels = make_images(64, seed=9)
    pack = str(write_pack(tmp_path / "pack", images, labels, seq_len=64, shard_rows=4))
    mp.spawn(_ddp_worker, args=(pack, str(tmp_path / "ddp"), _free_port()), nprocs=2, join=True)
    ddp_losses = json.loads((tmp_path / "ddp" / "losses.json").read_text())

    ref = train(_cfg(), _GlobalBatches(pack), tmp_path / "single", verbose=False)
    assert len(ddp_losses) == len(ref.losses) == STEPS
    for a, b in zip(ddp_losses, ref.losses, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (ddp_losses, ref.losses)

    from trainer.checkpoint import load_checkpoint

    wd = load_checkpoint(tmp_path / "ddp").weights
    ws = load_checkpoint(tmp_path / "single").weights
    for k in ws:
        a, b = wd[k], ws[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias adds q·b_k to every logit of a query alike, which softmax cancels: its true
            # gradient is 0, what autograd returns is rounding noise, and AdamW scales noise up to
            # lr-sized steps. Compare the query and value biases; the key bias carries no signal.
            dim = a.numel() // 3
            a, b = torch.cat([a[:dim], a[2 * dim :]]), torch.cat([b[:dim], b[2 * dim :]])
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # Both ranks' data positions were saved (rank 1's stream is its own).
    meta = load_checkpoint(tmp_path / "ddp").meta
    assert meta["world_size"] == 2 and len(meta["data_positions"]) == 2


def test_rows_roundtrip_helper():
    # Rows.concat keeps per-row segment lists aligned with the rows.
    r = Rows(
        torch.zeros(1, 4, 3, dtype=torch.uint8).numpy(),
        torch.tensor([[1, 1, 2, 0]], dtype=torch.int16).numpy(),
        torch.zeros(1, 4, dtype=torch.int16).numpy(),
        torch.zeros(1, 4, dtype=torch.int16).numpy(),
        [torch.tensor([3, 1]).numpy()],
        [torch.tensor([1, 1]).numpy()],
        [torch.tensor([2, 1]).numpy()],
    )
    both = Rows.concat([r, r])
    assert len(both) == 2 and [x.tolist() for x in both.labels] == [[3, 1], [3, 1]]
