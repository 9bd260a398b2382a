"""Trainer reliability (issue 12): multi-thread determinism, impossible batch sizes, bad --out and
shard paths, warmup clamping, one metrics record per step after a resume."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import make_images, run_cli, tiny_train_config, write_pack

from trainer import checkpoint as ck
from trainer.data import open_source
from trainer.loop import train


@pytest.fixture
def two_threads():
    # The nondeterminism this guards against only exists with more than one intra-op thread.
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- 1. run-to-run determinism with 2 threads ------------------------------------------------------


@pytest.mark.parametrize("kind", ["learned", "absolute"])
def test_posemb_backward_is_deterministic_with_two_threads(two_threads, kind):
    from model.posemb import FactorizedPosEmb

    # 8192 tokens x 64 channels: well above the size at which torch's CPU kernels go parallel.
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(1, 40, (8192, 2), generator=g)
    pos = (torch.rand(8192, 2, generator=g) * grid).long()
    up = torch.randn(8192, 64, generator=g)
    torch.manual_seed(0)
    emb = FactorizedPosEmb(kind, 64, 64, 64)

    def grads() -> torch.Tensor:
        emb.zero_grad(set_to_none=True)
        emb(pos, grid).backward(up)
        return torch.cat([emb.table_y.grad, emb.table_x.grad])

    ref = grads()
    # The old lookup's threads race only while both run at once: enough passes to see it on a busy host.
    assert all(torch.equal(grads(), ref) for _ in range(16))


def _step_records(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def wide_pack(tmp_path_factory):
    # 8 rows x 128 tokens per micro-batch: enough tokens for the CPU kernels to use both threads.
    images, labels = make_images(96, seed=5)
    return write_pack(tmp_path_factory.mktemp("wp") / "pack", images, labels, seq_len=128, shard_rows=6)


def test_two_thread_training_is_reproducible_and_resumes_exactly(two_threads, tmp_path, wide_pack):
    cfg = tiny_train_config(
        **{
            "schedule.steps": 4,
            "data.batch_size": 8,
            "log_every": 1,
            "model.overrides": {"depth": 1, "dim": 64, "heads": 2},
        }
    )

    def src(info):
        return open_source(str(wide_pack), batch_size=8, seed=0)

    a = train(cfg, src, tmp_path / "a", verbose=False)
    b = train(cfg, src, tmp_path / "b", verbose=False)
    assert a.losses == b.losses  # exact float equality
    grad_a = [r["grad_norm"] for r in _step_records(tmp_path / "a")]
    assert len(grad_a) == 4 and grad_a == [r["grad_norm"] for r in _step_records(tmp_path / "b")]
    # Interrupted after step 2, resumed: the rest equals the uninterrupted run bit for bit.
    train(cfg, src, tmp_path / "c", stop_after=2, verbose=False)
    rest = train(cfg, src, tmp_path / "c", resume=True, verbose=False)
    assert rest.start_step == 2 and rest.losses == a.losses[2:]
    wa, wc = ck.load_checkpoint(tmp_path / "a").weights, ck.load_checkpoint(tmp_path / "c").weights
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


# ---- 10. one metrics record per step after kill + --resume -----------------------------------------


class _Killed(Exception):
    pass


class _DiesAfter:
    """A BatchSource that dies (as if the process were killed) when asked for batch ``n``."""

    def __init__(self, source, n: int) -> None:
        self.source, self.n = source, n

    def __getattr__(self, name):
        return getattr(self.source, name)

    def batches(self, start):
        for i, batch in enumerate(self.source.batches(start)):
            if i == self.n:
                raise _Killed
            yield batch


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory):
    images, labels = make_images(48, seed=5)
    return write_pack(tmp_path_factory.mktemp("sp") / "pack", images, labels, seq_len=64, shard_rows=6)


def test_resume_leaves_one_metrics_record_per_step(one_thread, tmp_path, small_pack):
    cfg = tiny_train_config(**{"schedule.steps": 8, "checkpoint.every": 3, "log_every": 1})
    run = tmp_path / "run"
    # Killed while fetching step 6's batch: steps 1-5 are logged, the newest checkpoint is step 3.
    with pytest.raises(_Killed):
        train(
            cfg,
            lambda info: _DiesAfter(open_source(str(small_pack), batch_size=4, seed=0), 5),
            run,
            verbose=False,
        )
    assert [r["step"] for r in _step_records(run)] == [1, 2, 3, 4, 5]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by the kill
    rest = train(
        cfg, lambda info: open_source(str(small_pack), batch_size=4, seed=0), run, resume=True, verbose=False
    )
    assert rest.start_step == 3
    assert [r["step"] for r in _step_records(run)] == list(range(1, 9))
    # The records of steps 4-5 are the resumed run's (the run is exact, so equal losses either way).
    assert [r["loss"] for r in _step_records(run)][3:] == rest.losses
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "checkpoint"] == [3, 6, 8]


# ---- CLI helpers -----------------------------------------------------------------------------------


TINY = ["--set", "model.overrides={depth: 1, dim: 32, heads: 2}", "--device", "cpu", "--batch-size", "2"]


# ---- warmup: clamped when not set, named by its flag when set ---------------------------------------


def test_short_run_clamps_the_default_warmup_and_says_so(one_thread, tmp_path, small_pack, capsys):
    code, cap = run_cli(
        ["train", "--data", str(small_pack), "--out", str(tmp_path / "r"), "--steps", "10", *TINY], capsys
    )
    assert code == 0, cap.err
    notes = [line for line in cap.err.splitlines() if "warmup" in line]
    assert len(notes) == 1 and "10 steps" in notes[0] and "--warmup" in notes[0], cap.err
    meta = ck.load_checkpoint(tmp_path / "r").meta
    assert meta["config"]["schedule"] == {**meta["config"]["schedule"], "steps": 10, "warmup_steps": 1}
    # Resuming (here: extending the run) keeps the run's warmup rather than clamping anew.
    code, cap = run_cli(
        [
            "train",
            "--data",
            str(small_pack),
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "12",
            "--resume",
            *TINY,
        ],
        capsys,
    )
    assert code == 0, cap.err
    assert ck.load_checkpoint(tmp_path / "r").meta["config"]["schedule"]["warmup_steps"] == 1


def test_warmup_flag_longer_than_the_run_is_named(tmp_path, small_pack, capsys):
    code, cap = run_cli(
        [
            "train",
            "--data",
            str(small_pack),
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "20",
            "--warmup",
            "50",
            *TINY,
        ],
        capsys,
    )
    assert code == 2
    assert cap.err.strip().count("\n") == 0 and "--warmup 50" in cap.err and "--steps" in cap.err, cap.err
    assert not (tmp_path / "r").exists()


# ---- --out: a file, under a file, a non-empty folder that is not a run -----------------------------


@pytest.mark.parametrize("case", ["file", "under_file", "foreign_dir"])
def test_bad_out_is_refused_in_one_line(tmp_path, small_pack, capsys, case):
    (tmp_path / "f").write_text("not a folder\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "run", "foreign_dir": tmp_path / "photos"}[
        case
    ]
    code, cap = run_cli(
        ["train", "--data", str(small_pack), "--out", str(out), "--steps", "2", "--warmup", "1", *TINY],
        capsys,
    )
    assert code == 2, cap.err
    assert cap.err.strip().count("\n") == 0 and str(out) in cap.err, cap.err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f", "holiday.jpg", "photos"]


def test_out_of_an_unfinished_run_starts_afresh(one_thread, tmp_path, small_pack, capsys):
    # Killed before its first checkpoint: metrics but no checkpoint. A new run may use the folder,
    # and only its own step records remain.
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n{"step": 1, "loss": 9.0}\n')
    code, cap = run_cli(
        ["train", "--data", str(small_pack), "--out", str(run), "--steps", "2", *TINY], capsys
    )
    assert code == 0, cap.err
    assert [r["step"] for r in _step_records(run)] == [2]
    assert all(r["loss"] != 9.0 for r in _step_records(run))


# ---- shards: a truncated one without verification, paths outside the pack ---------------------------


def _copy_pack(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst, json.loads((dst / "index.json").read_text())


def test_truncated_shard_without_verify_is_one_line(tmp_path, small_pack, capsys):
    pack, idx = _copy_pack(small_pack, tmp_path / "pack")
    shard = pack / idx["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:300])
    argv = ["train", "--data", str(pack), "--out", str(tmp_path / "r"), "--steps", "2", "--warmup", "1"]
    code, cap = run_cli([*argv, *TINY, "--set", "data.verify=false"], capsys)
    assert code == 2, cap.err
    assert cap.err.strip().count("\n") == 0 and idx["shards"][1]["file"] in cap.err, cap.err
    assert "Traceback" not in cap.err


def test_shard_damaged_mid_run_is_one_line(tmp_path, small_pack):
    from packer.errors import DataError

    pack, idx = _copy_pack(small_pack, tmp_path / "pack")
    src = open_source(str(pack), batch_size=4, seed=0, verify=False)
    for entry in idx["shards"]:  # zero every page in place, keeping the footer the source has read
        f = pack / entry["file"]
        data = f.read_bytes()
        footer = int.from_bytes(data[-8:-4], "little")
        with open(f, "r+b") as out:
            out.seek(4)
            out.write(bytes(len(data) - footer - 12))
    with pytest.raises(DataError, match=r"shard-\d+\.parquet: row group \d+ unreadable") as e:
        for _ in zip(range(30), src.batches(), strict=False):
            pass
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_paths_are_confined_to_the_pack(tmp_path, small_pack, where):
    from packer.errors import DataError
    from trainer.shards import open_shard_set

    pack, idx = _copy_pack(small_pack, tmp_path / "pack")
    (tmp_path / "other").mkdir()
    outside = tmp_path / "other" / "shard.parquet"
    (pack / idx["shards"][0]["file"]).rename(outside)  # same bytes, same sha256: only the path is wrong
    idx["shards"][0]["file"] = "../other/shard.parquet" if where == "parent" else str(outside)
    (pack / "index.json").write_text(json.dumps(idx))
    for verify in (True, False):
        with pytest.raises(DataError, match="outside the pack") as e:
            open_shard_set(str(pack), verify=verify)
        assert "\n" not in str(e.value)


# ---- 2. impossible batch sizes, memory estimated before allocating ----------------------------------


def _pack_rows(pack) -> int:
    return json.loads((pack / "index.json").read_text())["totals"]["sequences"]


def test_batch_larger_than_the_pack_is_refused(tmp_path, small_pack, capsys):
    from packer.errors import ConfigError

    rows = _pack_rows(small_pack)
    assert open_source(str(small_pack), batch_size=rows, seed=0).batch_size == rows  # all of it: fine
    with pytest.raises(
        ConfigError, match=rf"--batch-size {rows + 1}: the pack has only {rows} rows per epoch"
    ):
        open_source(str(small_pack), batch_size=rows + 1, seed=0)
    # Under DDP a rank reads about half: the smallest rank's share is the limit, on every rank.
    for rank in (0, 1):
        with pytest.raises(ConfigError, match="with 2 processes a rank reads only"):
            open_source(str(small_pack), batch_size=rows // 2 + 2, seed=0, rank=rank, world_size=2)
    argv = ["train", "--data", str(small_pack), "--out", str(tmp_path / "r"), "--steps", "2", "--warmup", "1"]
    code, cap = run_cli([*argv, *TINY, "--batch-size", "100000"], capsys)
    assert code == 2 and cap.err.strip().count("\n") == 0 and "--batch-size 100000" in cap.err, cap.err
    assert not (tmp_path / "r").exists()


def test_step_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path, small_pack, monkeypatch):
    from packer.errors import ConfigError
    from trainer import memory

    cfg = tiny_train_config(**{"schedule.steps": 2})
    est = memory.estimate_step(0, 2, 64, 8 * 8 * 3, 4, 64, 1)
    # The activation floor of this config: 4 rows x 64 tokens x 2 blocks x 64 channels x 16 floats.
    assert est.activations == 4 * 64 * 2 * 64 * 16 * 4
    monkeypatch.setattr(memory, "available_bytes", lambda device: est.activations // 2)
    with pytest.raises(
        ConfigError, match=r"--batch-size 4 x seq_len 64 needs at least .* GiB per process"
    ) as e:
        train(
            cfg,
            lambda info: open_source(str(small_pack), batch_size=4, seed=0),
            tmp_path / "r",
            verbose=False,
        )
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()  # refused before the run folder, the model or a batch
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 2**30)
    assert (
        train(
            cfg,
            lambda info: open_source(str(small_pack), batch_size=4, seed=0),
            tmp_path / "r",
            verbose=False,
        ).steps
        == 2
    )


def test_activation_checkpointing_lowers_the_activation_floor():
    from trainer import memory

    plain = memory.estimate_step(0, 12, 192, 768, 8, 256, 1)
    ckpt = memory.estimate_step(0, 12, 192, 768, 8, 256, 1, grad_checkpoint=True)
    # block inputs (1 float per token, block, channel) + one block's 16 while it is recomputed
    assert ckpt.activations == 8 * 256 * 192 * (12 + 16) * 4 < plain.activations
