"""Hostile inputs to `navit plan` / `navit pack` (issue 12): special files, undecodable names,
unreadable folders, a source that does not exist, an --out that cannot be written.

Each test fails on the code before its fix: a FIFO made the header scan block in ``open()`` (the
``fifo_unblocker`` below turns that hang into a wrong answer instead of a stuck test), a name that is
not UTF-8 aborted planning with a UnicodeEncodeError, an unreadable folder vanished silently, a failed
pack locked its --out, and a bad --out was a traceback.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_images import encode, smooth_rgb
from PIL import Image

from packer.config import PackConfig
from packer.decode import DecodeError, read_bytes
from packer.headers import scan_headers_local
from packer.plan import make_plan, scan_source

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
