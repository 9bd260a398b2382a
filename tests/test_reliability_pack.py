"""Hostile inputs to `navit plan` / `navit pack` (issue 12): special files, undecodable names,
unreadable folders, a source that does not exist, an --out that cannot be written.

Each test fails on the code before its fix: a FIFO made the header scan block in ``open()`` (the
``fifo_unblocker`` below turns that hang into a wrong answer instead of a stuck test), a name that is
not UTF-8 aborted planning with a UnicodeEncodeError, an unreadable folder vanished silently, a failed
pack locked its --out, and a bad --out was a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fixtures_images import encode, smooth_rgb
from PIL import Image

from packer.build.decode import DecodeError, read_bytes
from packer.config import PackConfig
from packer.plan.headers import scan_headers_local
from packer.plan.planner import make_plan, scan_source

SEQ_LEN, P = 64, 16


def _cfg(**kw) -> PackConfig:
    base = {
        "packing": {"seq_len": SEQ_LEN, "patch_size": P},
        "resolution": {"kind": "uniform", "lo": 32, "hi": 64},
    }
    base.update(kw)
    return PackConfig.model_validate(base)


def _jpeg(seed: int = 0, w: int = 40, h: int = 30) -> bytes:
    return encode(Image.fromarray(smooth_rgb(w, h, seed), "RGB"), "JPEG", quality=90)


def _write(root: Path, rel: str | bytes, data: bytes) -> None:
    path = os.path.join(os.fsencode(root), rel if isinstance(rel, bytes) else rel.encode())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def fifo_unblocker(path: Path) -> Iterator[None]:
    """Keep opening ``path`` for writing (non-blocking, so it fails while nobody reads) and closing
    it: a reader stuck in ``open()`` on the FIFO is released and then reads end-of-file. Code that
    never opens the FIFO is unaffected; code that does gets an empty file instead of hanging."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.01)
                continue
            os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


# ----------------------------------------------------------------------------------------------------
# Item 3: only regular files are opened
# ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def special_files(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    _write(root, "a/ok.jpg", _jpeg(0))
    _write(root, "a/target.jpg", _jpeg(1))
    os.symlink(root / "a" / "target.jpg", root / "a" / "link.jpg")  # a symlink to a file: fine
    os.mkfifo(root / "a" / "x.jpg")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "a" / "s.png"))
    yield root
    sock.close()


def test_fifo_and_socket_are_rejected_with_a_reason_not_opened(special_files: Path) -> None:
    root = special_files
    with fifo_unblocker(root / "a" / "x.jpg"):
        scan = scan_source(str(root), _cfg(), use_ray=False)
        plan = make_plan(scan, _cfg())
        with pytest.raises(DecodeError) as e:
            read_bytes(str(root / "a" / "x.jpg"))
    assert e.value.reason == "not a regular file: named pipe (FIFO)"
    rejected = {Path(r.path).name: r.reason for r in plan.rejected}
    assert rejected == {
        "x.jpg": "not a regular file: named pipe (FIFO)",
        "s.png": "not a regular file: socket",
    }
    assert sorted(Path(p).name for p in plan.path) == ["link.jpg", "ok.jpg", "target.jpg"]
    # The same check covers manifests and plain header scans of any path.
    h = scan_headers_local([0, 1], [str(root / "a" / "x.jpg"), "/dev/null"], 10**8)
    assert h.reason == ["not a regular file: named pipe (FIFO)", "not a regular file: character device"]


# ----------------------------------------------------------------------------------------------------
# Item 4: file names that are not valid UTF-8
# ----------------------------------------------------------------------------------------------------

BAD_NAME = b"a/bad\xff\xfe.jpg"  # not UTF-8: Python lists it with surrogate escapes
BAD_FOLDER = b"caf\xe9/x.jpg"  # a Latin-1 class folder


def _reference_key_hash(raw: bytes) -> int:
    """FNV-1a over the bytes, then the splitmix64 finaliser of (hash ^ length): packer.plan.sampling's
    key hash, written out in plain Python."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for b in raw:
        h = ((h ^ b) * 0x100000001B3) & mask
    x = h ^ len(raw)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


@pytest.fixture()
def odd_names(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    _write(root, "a/ok.jpg", _jpeg(0))
    _write(root, BAD_NAME, _jpeg(1))
    _write(root, BAD_FOLDER, _jpeg(2))
    _write(root, b"a/broken\xff.png", b"not a png")  # rejected: its reason row must be writable too
    return root


def test_key_hash_of_an_undecodable_name_hashes_its_raw_bytes() -> None:
    from packer.plan.sampling import kept_token_indices, key_hash

    key = os.fsdecode(BAD_NAME)  # 'a/bad\udcff\udcfe.jpg'
    assert int(key_hash([key])[0]) == _reference_key_hash(BAD_NAME)
    assert int(key_hash(["a/ok.jpg"])[0]) == _reference_key_hash(b"a/ok.jpg")
    keep = kept_token_indices(3, 0, key, 20, 7)
    assert len(keep) == 7 and np.array_equal(keep, kept_token_indices(3, 0, key, 20, 7))


def test_undecodable_names_are_planned_and_reported_in_valid_utf8(odd_names: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    cfg = _cfg()
    plan = make_plan(scan_source(str(odd_names), cfg, use_ray=False), cfg)
    assert sorted(plan.key) == sorted(os.fsdecode(k) for k in (b"a/ok.jpg", BAD_NAME, BAD_FOLDER))
    assert plan.classes == ["a", "caf\\xe9"]  # class names are shown with the byte escaped
    assert [os.path.basename(os.fsencode(r.path)) for r in plan.rejected] == [b"broken\xff.png"]
    # The planned path still opens the file (the escaped form is for display only).
    bad = plan.key.index(os.fsdecode(BAD_NAME))
    assert read_bytes(plan.path[bad]) == _jpeg(1)
    res = CliRunner().invoke(app, ["plan", str(odd_names), "--seq-len", "64", "--patch-size", "16"])
    assert res.exit_code == 0, res.output
    assert "3 planned, 1 rejected" in res.output and "caf\\xe9 1" in res.output
    res = CliRunner().invoke(app, ["plan", str(odd_names), "--seq-len", "64", "--patch-size", "16", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["labels"] == {"a": 2, "caf\\xe9": 1}


@pytest.mark.ray
def test_header_scan_on_ray_carries_undecodable_paths(odd_names: Path, ray_session) -> None:
    cfg = _cfg()
    local = scan_source(str(odd_names), cfg, use_ray=False).headers
    remote = scan_source(str(odd_names), cfg, use_ray=True, workers=1).headers
    assert remote.reason == local.reason and remote.format == local.format
    assert np.array_equal(remote.width, local.width) and np.array_equal(remote.height, local.height)


def _pack_cli(source: Path, out: Path, *extra: str):
    from typer.testing import CliRunner

    from cli.main import app

    args = ["pack", str(source), "--out", str(out), "--seq-len", "64", "--patch-size", "16"]
    args += ["--resolution", "uniform:32:64", "--workers", "1", *extra]
    return CliRunner().invoke(app, args)


@pytest.mark.ray
@pytest.mark.slow
def test_pack_writes_undecodable_names_escaped_and_packs_them(odd_names: Path, tmp_path: Path, ray_session):
    import pyarrow.parquet as pq

    from packer import schema

    res = _pack_cli(odd_names, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "4 in = 3 packed + 1 rejected" in res.output
    out = tmp_path / "out"
    images = pq.read_table(out / schema.IMAGES_FILE).to_pylist()
    names = {os.path.relpath(r["path"], str(odd_names)): r["rejected_reason"] for r in images}
    assert names == {
        "a/ok.jpg": None,
        "a/bad\\xff\\xfe.jpg": None,
        "caf\\xe9/x.jpg": None,
        "a/broken\\xff.png": "not an image (unrecognised file format)",
    }
    lines = (out / schema.REJECTED_FILE).read_bytes().decode("utf-8").splitlines()
    assert [json.loads(x)["path"].endswith("a/broken\\xff.png") for x in lines] == [True]
    index = schema.read_index(str(out))
    assert index["classes"] == ["a", "caf\\xe9"] and index["totals"]["images_packed"] == 3


# ----------------------------------------------------------------------------------------------------
# Item 8: a folder that cannot be listed is recorded, never dropped silently
# ----------------------------------------------------------------------------------------------------


def make_unlistable(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """Listing ``folders`` fails with EACCES, as after ``chmod 000`` — which root would ignore, so
    the failure is injected where os.walk lists a folder (os.scandir)."""
    real = os.scandir
    blocked = {os.path.abspath(f) for f in folders}

    def scandir(path: str | bytes | int = "."):
        if not isinstance(path, int) and os.path.abspath(os.fsdecode(path)) in blocked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture()
def locked_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "src"
    for k, rel in enumerate(("a/1.jpg", "b/locked/2.jpg", "c/4.jpg", "locked/3.jpg")):
        _write(root, rel, _jpeg(k))
    make_unlistable(monkeypatch, root / "b" / "locked", root / "locked")
    return root


def test_unreadable_subfolder_is_a_rejection_not_a_silent_skip(locked_tree: Path) -> None:
    from packer.analysis.report import plan_report
    from packer.plan.sources import list_source

    root = locked_tree
    lst = list_source(str(root))
    assert lst.keys == ["a/1.jpg", "b/locked/", "c/4.jpg", "locked/"]
    assert [(r.image_id, r.reason) for r in lst.rejected] == [
        (1, "unreadable folder: permission denied"),
        (3, "unreadable folder: permission denied"),
    ]
    assert lst.rejected[0].path == str(root / "b" / "locked")
    # The folder keeps the label its images would have had (so class indices do not shift).
    assert lst.classes == ["a", "b", "c", "locked"] and lst.labels.tolist() == [0, 1, 2, 3]
    assert lst.skipped == []
    cfg = _cfg()
    plan = make_plan(scan_source(str(root), cfg, use_ray=False), cfg)
    assert len(plan.image_id) == 2 and len(plan.rejected) == 2
    rep = plan_report(plan, cfg)
    assert rep["images_in"] == 4 and rep["rejected_by_reason"] == {"unreadable folder": 2}


def test_unreadable_source_root_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from packer.errors import NavitError
    from packer.plan.sources import list_source

    _write(tmp_path / "src", "a/1.jpg", _jpeg(0))
    make_unlistable(monkeypatch, tmp_path / "src")
    with pytest.raises(NavitError, match=r"cannot list the source folder \(permission denied\)"):
        list_source(str(tmp_path / "src"))


@pytest.mark.ray
@pytest.mark.slow
def test_pack_records_and_summarises_unreadable_folders(locked_tree: Path, tmp_path: Path, ray_session):
    from packer import schema

    out = tmp_path / "out"
    res = _pack_cli(locked_tree, out)
    assert res.exit_code == 0, res.output
    assert "4 in = 2 packed + 2 rejected" in res.output
    assert "2 folders could not be listed" in res.output
    lines = [json.loads(x) for x in (out / schema.REJECTED_FILE).read_text().splitlines()]
    assert [(os.path.relpath(x["path"], str(locked_tree)), x["reason"]) for x in lines] == [
        ("b/locked", "unreadable folder: permission denied"),
        ("locked", "unreadable folder: permission denied"),
    ]
    totals = schema.read_index(str(out))["totals"]
    assert totals["images_in"] == totals["images_packed"] + totals["images_rejected"] == 4
    assert totals["folders_unreadable"] == 2


# ----------------------------------------------------------------------------------------------------
# Item 7: a pack that built no shard does not lock its --out
# ----------------------------------------------------------------------------------------------------


def test_missing_source_leaves_out_untouched_and_reusable(tmp_path: Path) -> None:
    from packer.build.outdir import STATE_FILE, prepare_out_dir
    from packer.build.pipeline import pack
    from packer.errors import NavitError

    cfg = _cfg()
    out = tmp_path / "m1"
    with pytest.raises(NavitError, match="source not found"):
        pack(str(tmp_path / "nonexistent"), str(out), cfg)
    assert not out.exists()  # validated before anything was written
    _write(tmp_path / "src", "a/1.jpg", _jpeg(0))
    prepare_out_dir(str(out), cfg, str(tmp_path / "src"), resume=False)  # the right source: accepted
    assert (out / STATE_FILE).is_file()


def test_out_holding_only_the_state_of_a_run_that_built_nothing_is_free(tmp_path: Path) -> None:
    """A run killed while planning leaves state.json and no shard: any source may use the folder."""
    from packer.build.outdir import STATE_FILE, prepare_out_dir
    from packer.errors import NavitError

    cfg, out = _cfg(), tmp_path / "m1"
    prepare_out_dir(str(out), cfg, "/data/wrong", resume=False)
    prepare_out_dir(str(out), cfg, "/data/right", resume=False)
    assert json.loads((out / STATE_FILE).read_text())["source"] == "/data/right"
    # Once a shard exists the folder is a pack of that source again, and is protected.
    _write(out, "shards/shard-000000.parquet", b"PAR1")
    with pytest.raises(NavitError, match="different source"):
        prepare_out_dir(str(out), cfg, "/data/other", resume=False)


@pytest.mark.ray
def test_failed_planning_removes_the_state_it_wrote(tmp_path: Path, ray_session) -> None:
    from packer.build.pipeline import pack
    from packer.errors import DataError

    _write(tmp_path / "src", "a/1.jpg", _jpeg(0))
    (tmp_path / "kept").mkdir()

    def planner(source: str, cfg: PackConfig, epoch: int):
        raise DataError("planning failed")

    for out in (tmp_path / "new", tmp_path / "kept"):
        with pytest.raises(DataError, match="planning failed"):
            pack(str(tmp_path / "src"), str(out), _cfg(), planner=planner)
    assert not (tmp_path / "new").exists()  # created by the failed run: removed again
    assert list((tmp_path / "kept").iterdir()) == []  # the user's folder: left as it was


# ----------------------------------------------------------------------------------------------------
# Item 5 (pack side): an --out that cannot be written is one line, exit code 2
# ----------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _navit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("[pack]")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr


def test_out_under_a_regular_file_is_a_one_line_error(tmp_path: Path) -> None:
    _write(tmp_path / "src", "a/1.jpg", _jpeg(0))
    (tmp_path / "afile").write_text("not a folder")
    proc = _navit("pack", str(tmp_path / "src"), "--out", str(tmp_path / "afile" / "sub"))
    _assert_one_line_error(proc, "--out", "afile/sub", "cannot write the pack there", "Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_out_folder_is_a_one_line_error(tmp_path: Path) -> None:
    _write(tmp_path / "src", "a/1.jpg", _jpeg(0))
    (tmp_path / "ro").mkdir(mode=0o555)
    proc = _navit("pack", str(tmp_path / "src"), "--out", str(tmp_path / "ro"))
    _assert_one_line_error(proc, "--out", "cannot write the pack there", "Permission denied")


def test_a_manifest_that_is_a_fifo_is_refused_not_opened(tmp_path: Path) -> None:
    from packer.errors import NavitError
    from packer.plan.sources import list_source

    os.mkfifo(tmp_path / "list.csv")
    with fifo_unblocker(tmp_path / "list.csv"), pytest.raises(NavitError) as e:
        list_source(str(tmp_path / "list.csv"))
    assert str(e.value) == f"source {tmp_path / 'list.csv'}: not a regular file: named pipe (FIFO)"
