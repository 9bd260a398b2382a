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


# ---- issue 20: a full disk while checkpointing, and --resume while it is still full -----------------


class _FillsUp:
    """A file whose disk fills up after ``room`` bytes: the write that does not fit raises ENOSPC."""

    def __init__(self, path, room: int) -> None:
        self.f, self.room = open(path, "wb"), room  # noqa: SIM115 - closed in __exit__

    def write(self, data) -> int:
        import errno
        import os

        data = data.encode() if isinstance(data, str) else bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def _temp_leftovers(run) -> list[str]:
    return sorted(p.name for p in run.rglob("*") if ".tmp-" in p.name or p.name == ".navit-lock")


def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_temp(
    one_thread, tmp_path, small_pack, capsys, monkeypatch
):
    from trainer import metrics

    run = tmp_path / "run"
    argv = ["train", "--data", str(small_pack), "--out", str(run), "--steps", "4", "--checkpoint-every", "2"]
    argv += [*TINY, "--warmup", "1", "--set", "log_every=1"]
    real_open = ck.open_for_write
    with monkeypatch.context() as m:  # the disk fills while step 4's state.pt is written
        m.setattr(
            ck,
            "open_for_write",
            lambda p: _FillsUp(p, 100) if "tmp-step-00000004" in str(p) else real_open(p),
        )
        code, cap = run_cli(argv, capsys)
    assert code == 2, cap.err
    line = cap.err.strip().splitlines()[-1]
    assert "Traceback" not in cap.err and "no space left on device" in line and f"--out {run}" in line, (
        cap.err
    )
    assert "last good checkpoint" in line and "step-00000002" in line, line
    assert _temp_leftovers(run) == []
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000002"]

    # --resume while the disk is still full: the metrics rewind (steps 3-4 are logged) cannot write.
    before = (run / "metrics.jsonl").read_bytes()
    real = open

    def full_open(path, mode="r", *a, **kw):
        return _FillsUp(path, 10) if ".tmp-" in str(path) else real(path, mode, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(metrics, "open", full_open, raising=False)
        code, cap = run_cli([*argv, "--resume"], capsys)
    assert code == 2, cap.err
    assert cap.err.strip().count("\n") == 0 and "no space left on device" in cap.err, cap.err
    assert "step-00000002" in cap.err
    assert _temp_leftovers(run) == [] and (run / "metrics.jsonl").read_bytes() == before

    # Temp files of a run killed mid-write are removed at the next start; the resumed run completes.
    (run / "checkpoints" / ".tmp-step-00000003-deadbeef").mkdir()
    (run / "checkpoints" / ".tmp-step-00000003-deadbeef" / "state.pt").write_bytes(b"x" * 1000)
    (run / ".metrics.jsonl.tmp-999999").write_text("{}\n")
    code, cap = run_cli([*argv, "--resume"], capsys)
    assert code == 0, cap.err
    assert _temp_leftovers(run) == []
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000002", "step-00000004"]


def test_disk_full_in_the_weights_file_is_reported_as_such(tmp_path, monkeypatch):
    """safetensors writes the weights itself (Rust): its ENOSPC arrives as a SafetensorError."""
    import safetensors.torch
    from safetensors import SafetensorError

    from trainer.diskfull import DiskFullError

    def full_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    model = torch.nn.Linear(4, 2)
    ck.save_checkpoint(tmp_path, 1, model, {}, {})
    monkeypatch.setattr(safetensors.torch, "save_file", full_save_file)
    with pytest.raises(
        DiskFullError, match=r"no space left on device while saving checkpoint step-00000002"
    ) as e:
        ck.save_checkpoint(tmp_path, 2, model, {}, {})
    assert "last good checkpoint" in str(e.value) and "step-00000001" in str(e.value)
    assert _temp_leftovers(tmp_path) == []


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    import subprocess

    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    except OSError as e:
        pytest.skip(f"cannot mount a small filesystem here: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {r.stderr.decode(errors='replace').strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs, name: str, leave: int) -> None:
    """Fill the filesystem ``fs`` with file ``name`` until at most ``leave`` bytes are free."""
    import os

    with open(fs / name, "wb") as f:
        while True:
            st = os.statvfs(fs)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                return
            try:
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
            except OSError:
                return


class _FillsDiskAt:
    """A BatchSource that fills the disk (leaving ``leave`` bytes) when asked for batch ``n``."""

    def __init__(self, source, n: int, fs, leave: int) -> None:
        self.source, self.n, self.fs, self.leave = source, n, fs, leave

    def __getattr__(self, name):
        return getattr(self.source, name)

    def batches(self, start):
        for i, batch in enumerate(self.source.batches(start)):
            if i == self.n:
                _fill(self.fs, "filler", self.leave)
            yield batch


def test_disk_full_on_a_real_small_filesystem(one_thread, small_fs, small_pack):
    from trainer.diskfull import DiskFullError

    run = small_fs / "run"
    cfg = tiny_train_config(**{"schedule.steps": 6, "checkpoint.every": 2, "log_every": 1})

    def src(info):
        return open_source(str(small_pack), batch_size=4, seed=0)

    # Step 2's checkpoint fits; then the disk fills (8 KiB left: metrics lines fit, a checkpoint not).
    with pytest.raises(DiskFullError) as e:
        train(cfg, lambda info: _FillsDiskAt(src(info), 2, small_fs, 8192), run, verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and "no space left on device" in msg and "step-00000002" in msg, msg
    assert _temp_leftovers(run) == []
    # Still full (to the last byte): --resume fails in one line and leaves nothing behind.
    _fill(small_fs, "filler2", 0)
    listing = sorted(str(p) for p in run.rglob("*"))
    with pytest.raises(DiskFullError) as e:
        train(cfg, src, run, resume=True, verbose=False)
    assert "\n" not in str(e.value) and "step-00000002" in str(e.value)
    assert sorted(str(p) for p in run.rglob("*")) == listing
    # Space freed: the run resumes and completes.
    (small_fs / "filler").unlink()
    (small_fs / "filler2").unlink()
    assert train(cfg, src, run, resume=True, verbose=False).steps == 6
    assert [p.name for p in ck.list_checkpoints(run)][-1] == "step-00000006"


# ---- issue 21: one run per --out (a lock), SIGTERM/SIGINT save a checkpoint (real processes) --------


def _navit(argv: list[str]) -> tuple[list[str], dict, str]:
    """The command line, environment and cwd that run ``navit ARGV`` from this checkout."""
    import os
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return [sys.executable, "-m", "cli.main", *argv], env, root


def _spawn(argv: list[str], err_file):
    """``navit ARGV`` as its own process, stderr to ``err_file``."""
    import subprocess

    cmd, env, root = _navit(argv)
    with open(err_file, "w") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err)


def _wait_for_step(run, proc, err_file, step: int, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and any(r["step"] >= step for r in _step_records(run)):
            return
        assert proc.poll() is None, f"exited {proc.returncode}: {err_file.read_text()}"
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s: {err_file.read_text()}")


def _stop(proc, sig, timeout: float = 180) -> int:
    import subprocess

    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _wait_for_file(path, proc, err_file, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode}: {err_file.read_text()}"
        assert time.monotonic() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.1)


def test_second_run_on_one_out_is_refused_and_sigterm_saves_a_checkpoint(tmp_path, small_pack, capsys):
    import signal
    import subprocess

    from packer.dirlock import LOCK_NAME

    run, err = tmp_path / "run", tmp_path / "err"
    argv = ["train", "--data", str(small_pack), "--steps", "100000", *TINY, "--warmup", "1"]
    argv += ["--set", "log_every=1", "--checkpoint-every", "0"]
    proc = _spawn([*argv, "--out", str(run)], err)
    try:
        _wait_for_file(run / LOCK_NAME, proc, err)
        # Another run on the same --out (other settings, as in the issue): refused at once, in one line.
        other = ["train", "--data", str(small_pack), "--steps", "3", *TINY, "--warmup", "1", "--lr", "0.01"]
        cmd, env, root = _navit([*other, "--out", str(run)])
        second = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().count("\n") == 0, second.stderr
        assert f"in use by navit train (pid {proc.pid}" in second.stderr, second.stderr
        _wait_for_step(run, proc, err, 2)
        code = _stop(proc, signal.SIGTERM)  # what a cluster sends to preempt a job
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert code == 143, text[-2000:]
    last = text.strip().splitlines()[-1]
    assert "Traceback" not in text and last.startswith("stopped by SIGTERM at step "), text[-2000:]
    # The checkpoint is of the step it was at (the last step it logged): nothing trained is lost.
    at = max(r["step"] for r in _step_records(run))
    assert f"saved checkpoint {run}/checkpoints/step-{at:08d}; continue with --resume" in last, last
    assert [p.name for p in ck.list_checkpoints(run)] == [f"step-{at:08d}"]
    assert not (run / LOCK_NAME).exists()
    # A lock file left by a process that died (kill -9 leaves it; no process holds it): not in the way.
    (run / LOCK_NAME).write_text(json.dumps({"pid": proc.pid, "host": "vm", "what": "navit train"}))
    argv = [
        "train",
        "--data",
        str(small_pack),
        "--out",
        str(run),
        "--steps",
        str(at + 1),
        *TINY,
        "--warmup",
        "1",
    ]
    code, cap = run_cli([*argv, "--set", "log_every=1", "--checkpoint-every", "0", "--resume"], capsys)
    assert code == 0, cap.err
    assert ck.load_checkpoint(run).step == at + 1 and not (run / LOCK_NAME).exists()


class _SignalsAt:
    """A BatchSource that sends this process ``sig`` when asked for batch ``n`` (a signal during the
    loop's data wait)."""

    def __init__(self, source, n: int, sig) -> None:
        self.source, self.n, self.sig = source, n, sig

    def __getattr__(self, name):
        return getattr(self.source, name)

    def batches(self, start):
        import os

        for i, batch in enumerate(self.source.batches(start)):
            if i == self.n:
                os.kill(os.getpid(), self.sig)
            yield batch


@pytest.mark.parametrize("when", ["data_wait", "compute", "twice"])
def test_sigint_saves_the_current_step_and_says_so(one_thread, tmp_path, small_pack, monkeypatch, when):
    import os
    import signal

    from packer.errors import Stopped
    from trainer.metrics import MetricsLogger

    cfg = tiny_train_config(**{"schedule.steps": 50, "log_every": 1})
    source = open_source(str(small_pack), batch_size=4, seed=0)
    if when == "data_wait":  # while fetching step 4's batch: the checkpoint is of step 3
        src, at = _SignalsAt(source, 3, signal.SIGINT), 3
    else:  # while step 3 is logged: step 3 completes, then its checkpoint is saved
        src, at = source, 3
        logged = MetricsLogger.step

        def step(self, n, *a):
            if n == at:
                os.kill(os.getpid(), signal.SIGINT)
            return logged(self, n, *a)

        monkeypatch.setattr(MetricsLogger, "step", step)
    if when == "twice":  # a second Ctrl-C while the checkpoint is written: stop without it
        saving = ck.save_checkpoint

        def save(*a, **kw):
            os.kill(os.getpid(), signal.SIGINT)
            return saving(*a, **kw)

        monkeypatch.setattr(ck, "save_checkpoint", save)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped) as e:
        train(cfg, lambda info: src, tmp_path / "run", verbose=False)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is the caller's again
    msg = str(e.value)
    assert e.value.exit_code == 130 and "\n" not in msg
    if when == "twice":
        assert msg.startswith("interrupted (SIGINT) again before the checkpoint was written"), msg
        assert ck.list_checkpoints(tmp_path / "run") == [] and _temp_leftovers(tmp_path / "run") == []
        return
    assert msg.startswith(f"interrupted (SIGINT) at step {at}: saved checkpoint"), msg
    assert [p.name for p in ck.list_checkpoints(tmp_path / "run")] == [f"step-{at:08d}"]
    assert max(r["step"] for r in _step_records(tmp_path / "run")) == at


def test_live_mode_lists_rejected_inputs_and_stops_on_sigterm_in_one_line(tmp_path):
    import signal

    from fixtures_images import messy_image_folder

    folder = messy_image_folder(tmp_path / "img", n_good=12)
    run, err = tmp_path / "run", tmp_path / "err"
    argv = ["train", "--images", str(tmp_path / "img"), "--out", str(run), "--steps", "100000"]
    argv += ["--batch-size", "2", "--warmup", "1", "--device", "cpu", "--seq-len", "64", "--patch-size", "16"]
    argv += ["--resolution", "uniform:32:64", "--set", "model.overrides={depth: 1, dim: 32, heads: 2}"]
    argv += ["--set", "log_every=1", "--checkpoint-every", "0", "--workers", "0"]
    proc = _spawn(argv, err)
    try:
        _wait_for_step(run, proc, err, 2)  # epoch 0 is one shard: built (and its rejections known) by now
        code = _stop(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert code == 143, text[-3000:]
    # One line for the stop; none of Ray's C-level stack dump ("*** SIGTERM received ...", "@ 0x...").
    other = [x for x in text.splitlines() if not x.startswith(("step ", "navit train: "))]
    assert len(other) == 1 and other[0].startswith("stopped by SIGTERM at step "), text[-3000:]
    assert "saved checkpoint" in other[0] and ck.list_checkpoints(run)
    # Every input the live pipeline could not pack, with its reason (header scan and pixel decode).
    rejected = [json.loads(x) for x in (run / "rejected.jsonl").read_text().splitlines()]
    epoch0 = {r["path"]: r["reason"] for r in rejected if r["epoch"] == 0}
    assert sorted(epoch0) == sorted(str(tmp_path / "img" / b) for b in folder["bad"])
    assert epoch0[str(tmp_path / "img" / "triangle" / "zero.jpg")] == "zero-byte file"
    assert epoch0[str(tmp_path / "img" / "triangle" / "truncated.jpg")].startswith(
        "corrupt or truncated image"
    )


def test_activation_checkpointing_lowers_the_activation_floor():
    from trainer import memory

    plain = memory.estimate_step(0, 12, 192, 768, 8, 256, 1)
    ckpt = memory.estimate_step(0, 12, 192, 768, 8, 256, 1, grad_checkpoint=True)
    # block inputs (1 float per token, block, channel) + one block's 16 while it is recomputed
    assert ckpt.activations == 8 * 256 * 192 * (12 + 16) * 4 < plain.activations
