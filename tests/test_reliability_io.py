"""`navit pack` when the machine fails under it (issues 20-22): a full disk, a second pack into the
same --out, SIGTERM.

Each test fails on the code before its fix: a full disk was a 71-line Ray traceback (exit 1) that
left a ``shard-*.parquet.tmp-*`` behind, two packs into one --out both "succeeded" with one's
index.json over the other's shards, and SIGTERM made Ray's C-level handler dump a stack and abort.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from packer import schema
from packer.errors import NavitError

pytestmark = [pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--seq-len", "64", "--patch-size", "16", "--resolution", "uniform:32:64", "--shard-rows", "1"]
FLAGS += ["--epochs", "2", "--workers", "1"]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _temp_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp-" in p.name]


def _pack(src: Path, out: Path, *extra: str):
    """`navit pack` in this process (the shared Ray session); returns typer's Result."""
    from cli.main import app

    return CliRunner().invoke(app, ["pack", str(src), "--out", str(out), *FLAGS, *extra])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    from packer.synth import generate

    root = tmp_path_factory.mktemp("io") / "img"
    generate(root, n=24, seed=5, threads=1)
    return root


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory, ray_session) -> dict[str, bytes]:
    """The pack every interrupted-then-resumed run must equal, byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "pack"
    res = _pack(src, out)
    assert res.exit_code == 0, res.output
    return _tree(out)


# ----------------------------------------------------------------------------------------------------
# Disk full
# ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def small_fs(tmp_path: Path):
    """A 256 KiB tmpfs (the pack needs ~1.4 MB); skipped where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({r.stderr.decode().strip() or r.returncode})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_leaves_no_temp_file_and_resumes_identically(src, reference, small_fs):
    out = small_fs / "pack"
    res = _pack(src, out)
    assert isinstance(res.exception, NavitError), res.output
    assert str(res.exception).startswith(f"--out {out}: no space left on device"), res.exception
    assert _temp_files(small_fs) == [] and not (out / schema.INDEX_FILE).exists()
    assert list(out.glob("shards/*.parquet")), "some shards were written before the disk filled"
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    res = _pack(src, out, "--resume")
    assert res.exit_code == 0, res.output
    assert _tree(out) == reference


def _fail_fsync_of(monkeypatch: pytest.MonkeyPatch, marker: str) -> None:
    """os.fsync of a file whose name contains ``marker`` fails with ENOSPC, after the data was
    written to the temp file (what a full disk does at write-back)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_enospc_in_a_shard_task_is_reported_and_its_temp_file_removed(src, tmp_path, monkeypatch):
    """The worker side, called directly (Ray workers are other processes): the failed write comes
    back as the task's result, not as an exception for Ray to print."""
    from packer.build.execute import _shard_udf
    from packer.build.layout import shard_tasks
    from packer.config import PackConfig
    from packer.plan.planner import make_plan, scan_source

    cfg = PackConfig.model_validate({"packing": {"seq_len": 64, "patch_size": 16}})
    task = shard_tasks(make_plan(scan_source(str(src), cfg, use_ray=False), cfg), cfg.seed, 2)[0]
    _fail_fsync_of(monkeypatch, "shard-000000.parquet.tmp-")
    result = _shard_udf(pa.table({"task": [task]}), cfg.model_dump_json(), str(tmp_path), False)
    meta = json.loads(result.column("meta")[0].as_py())
    assert meta["write_error"]["errno"] == errno.ENOSPC
    assert _temp_files(tmp_path) == [] and not (tmp_path / schema.shard_file_name(0)).exists()


def test_enospc_on_the_driver_is_one_line_and_resumes_identically(src, reference, tmp_path, monkeypatch):
    out = tmp_path / "pack"
    with monkeypatch.context() as m:
        _fail_fsync_of(m, "images.parquet.tmp-")  # the driver's write, after every shard
        res = _pack(src, out)
    assert isinstance(res.exception, NavitError), res.output
    assert str(res.exception).startswith(f"--out {out}: no space left on device"), res.exception
    assert _temp_files(out) == [] and not (out / schema.INDEX_FILE).exists()
    res = _pack(src, out, "--resume")
    assert res.exit_code == 0, res.output
    assert "(0 built, " in res.output, res.output  # every shard was verified and kept
    assert _tree(out) == reference


# ----------------------------------------------------------------------------------------------------
# Two packs into one --out
# ----------------------------------------------------------------------------------------------------


def _navit(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )  # fmt: skip


def test_a_second_pack_into_the_same_out_is_refused_and_the_first_completes(src, tmp_path, ray_session):
    from packer.build.pipeline import pack
    from packer.config import PackConfig
    from packer.plan.planner import make_plan, scan_source

    out = tmp_path / "pack"
    cfg = PackConfig.model_validate(
        {"packing": {"seq_len": 64, "patch_size": 16}, "output": {"shard_rows": 2, "epochs": 2}}
    )
    planning, go = threading.Event(), threading.Event()

    def planner(source: str, c: PackConfig, epoch: int):
        planning.set()
        assert go.wait(120)
        return make_plan(scan_source(source, c, use_ray=False), c, epoch)

    first: dict = {}

    def run() -> None:
        try:
            first["result"] = pack(str(src), str(out), cfg, workers=1, planner=planner)
        except BaseException as e:  # reported by the assertion below
            first["error"] = e

    t = threading.Thread(target=run)
    t.start()
    try:
        assert planning.wait(120)  # the first run holds --out (it is planning)
        second = _navit("pack", str(src), "--out", str(out), "--seq-len", "128", "--epochs", "1")
        _, err = second.communicate(timeout=120)
    finally:
        go.set()
        t.join(300)
    assert second.returncode == 2, err
    lines = [x for x in err.splitlines() if not x.startswith("[pack] planning")]
    assert len(lines) == 1 and "another navit pack is writing there (pid" in lines[0], err
    assert f"pid {os.getpid()} on " in lines[0]
    assert "error" not in first, first.get("error")
    index = schema.read_index(str(out))
    assert index["seq_len"] == 64 and index["epochs"] == 2 and index["fingerprint"] == cfg.fingerprint()
    assert schema.verify_shards(str(out), index) == []
    assert not (out / ".navit-pack" / "lock").exists()  # released: the next run may write


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    """flock dies with its process: a lock file whose holder is gone does not block anyone."""
    import pyarrow.fs as pafs

    from packer.build.outlock import OutLock

    state = tmp_path / ".navit-pack"
    state.mkdir()
    (state / "lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": 0}))
    fs = pafs.LocalFileSystem()
    lock = OutLock.take(fs, str(state), "X", create=True)
    assert lock is not None
    with pytest.raises(NavitError, match=r"another navit pack is writing there \(pid \d+ on "):
        OutLock.take(fs, str(state), "X", create=True)  # another open file description: refused
    lock.release()
    assert not (state / "lock").exists()
    OutLock.take(fs, str(state), "X", create=True).release()


# ----------------------------------------------------------------------------------------------------
# SIGTERM
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_is_one_line_exit_143_and_resumes_identically(src, reference, tmp_path):
    out = tmp_path / "pack"
    proc = _navit("pack", str(src), "--out", str(out), *FLAGS, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    deadline = time.monotonic() + 240
    while not list(out.glob("shards/*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if not x.startswith("[pack]")]
    assert lines == [
        "terminated (SIGTERM): the shards already written are kept; run the same command with --resume "
        "to finish"
    ], err
    assert _temp_files(out) == [] and not (out / schema.INDEX_FILE).exists()
    res = _pack(src, out, "--resume")
    assert res.exit_code == 0, res.output
    assert _tree(out) == reference
