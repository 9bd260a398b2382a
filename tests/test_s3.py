"""Object storage for real: a loopback S3 API server (moto's standalone server) started and stopped
here, and every command that takes a pack location run against it — `navit pack s3://… --out
s3://…` (and `--resume` after a shard object is deleted), `navit stats`, `navit train --data`,
`navit serve` read by a Flight client. The results must equal the same pack on local disk byte for
byte, and checksums must be verified when reading from the bucket.

Endpoint and credentials come the standard way: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (and once through pyarrow's URI options instead).
`navit pack` and `navit serve` run as subprocesses with that environment (Ray workers read the
image objects, so they must inherit it); stats and train run in this process.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from packer import schema

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # an S3 server, two Ray packs in subprocesses: ~60 s

ROOT = Path(__file__).resolve().parents[1]
NAVIT = [sys.executable, "-m", "cli.main"]
PACK_ARGS = ["--seq-len", "64", "--patch-size", "16", "--resolution", "uniform:32:96", "--shard-rows", "1"]
SRC, OUT = "s3://navit-src/img", "s3://navit-packs/p1"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; yields its AWS environment. Stopped afterwards."""
    port = _free_port()
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(endpoint, timeout=2).close()
                    break
                except urllib.error.HTTPError:  # it answers: up
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto server did not start (see {log.name})") from None
                    time.sleep(0.2)
            yield {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "navit-test",
                "AWS_SECRET_ACCESS_KEY": "navit-test-secret",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _env(s3: dict[str, str]) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3)
    return env


def _bucket_fs(s3: dict[str, str]) -> pafs.S3FileSystem:
    """A client for the test's own set-up (bucket creation, uploads, tampering) — not navit's."""
    host = s3["AWS_ENDPOINT_URL"].split("://", 1)[1]
    return pafs.S3FileSystem(
        access_key=s3["AWS_ACCESS_KEY_ID"],
        secret_key=s3["AWS_SECRET_ACCESS_KEY"],
        region=s3["AWS_DEFAULT_REGION"],
        endpoint_override=host,
        scheme="http",
        allow_bucket_creation=True,
    )


def _objects(fs: pafs.FileSystem, prefix: str) -> dict[str, bytes]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(prefix) + 1 :]] = f.read()
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _navit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*NAVIT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def packs(s3, tmp_path_factory, ray_session):
    """The same images packed twice: from a local folder to a local folder (embedded Ray, this
    process), and from the bucket to the bucket (`navit pack` in a subprocess)."""
    from cli.main import app
    from packer.synth import generate

    tmp = tmp_path_factory.mktemp("s3packs")
    generate(tmp / "img", n=40, seed=3, threads=1)
    fs = _bucket_fs(s3)
    fs.create_dir("navit-src")
    fs.create_dir("navit-packs")
    for f in sorted((tmp / "img").rglob("*.*")):
        with fs.open_output_stream(f"navit-src/img/{f.relative_to(tmp / 'img').as_posix()}") as o:
            o.write(f.read_bytes())
    local = tmp / "local"
    res = CliRunner().invoke(app, ["pack", str(tmp / "img"), "--out", str(local), *PACK_ARGS])
    assert res.exit_code == 0, res.output
    r = _navit(["pack", SRC, "--out", OUT, *PACK_ARGS, "--workers", "1"], _env(s3))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "40 in = 40 packed + 0 rejected" in r.stdout
    return local, fs


def test_pack_to_s3_is_byte_identical_to_local(packs):
    local, fs = packs
    remote = _objects(fs, "navit-packs/p1")
    here = _tree(local)
    shards = sorted(k for k in here if k.startswith("shards/"))
    assert len(shards) >= 4 and shards == sorted(k for k in remote if k.startswith("shards/"))
    assert all(remote[k] == here[k] for k in shards)
    assert remote["rejected.jsonl"] == here["rejected.jsonl"]
    # index.json and images.parquet name their source; everything else in them is equal.
    idx_r, idx_l = json.loads(remote["index.json"]), json.loads(here["index.json"])
    assert idx_r.pop("source") == SRC and idx_l.pop("source") == str(local.parent / "img")
    assert idx_r == idx_l
    img_r = pq.read_table(io.BytesIO(remote["images.parquet"]))
    img_l = pq.read_table(pa.BufferReader(here["images.parquet"]))
    assert img_r.drop_columns(["path"]).equals(img_l.drop_columns(["path"]))
    assert all(p.startswith("s3://navit-src/img/") for p in img_r.column("path").to_pylist())


def _keys(s3: dict[str, str], bucket: str) -> list[str]:
    """Every object key in ``bucket`` as S3 lists it (pyarrow hides directory-marker objects)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"],
        region_name=s3["AWS_DEFAULT_REGION"],
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_pack_to_s3_writes_no_directory_markers(packs, s3):
    """Object stores have no folders: the docs promise one object per file and nothing else (the
    state folder used to be created as an empty ``p1/.navit-pack/`` marker object)."""
    keys = [k for k in _keys(s3, "navit-packs") if k.startswith("p1/")]
    assert "p1/index.json" in keys and "p1/.navit-pack/state.json" in keys
    assert [k for k in keys if k.endswith("/")] == []


class _CuttableProxy:
    """A loopback TCP forwarder to the S3 server that can be cut (connections refused, as when the
    endpoint goes away) and restored on the same port."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, _free_port()
        self._open()

    def _open(self) -> None:
        import socket
        import threading

        self.conns: list = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        import contextlib
        import socket

        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        import contextlib
        import socket

        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self.listener.close()
        for sock in self.conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self._open()


def test_s3_unreachable_during_pack_is_one_line_and_resumable(packs, s3, tmp_path, ray_session):
    """The endpoint goes away once the pack has started (here: after OUT was checked and marked, while
    planning): the shard uploads fail on the Ray workers. Expected one line naming the endpoint, then
    `--resume` finishes the pack once the endpoint answers again. In this process, so the workers
    (started without the test's AWS environment) get endpoint and credentials from the URI."""
    from packer.build.pipeline import pack
    from packer.config import PackConfig
    from packer.errors import NavitError
    from packer.plan.planner import make_plan, scan_source
    from packer.synth import generate

    src = tmp_path / "img"
    generate(src, n=6, seed=1, threads=1)
    _, fs = packs
    fs.create_dir("navit-cut")
    proxy = _CuttableProxy(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    creds = f"{s3['AWS_ACCESS_KEY_ID']}:{s3['AWS_SECRET_ACCESS_KEY']}"
    out = f"s3://{creds}@navit-cut/p?endpoint_override=127.0.0.1:{proxy.port}&scheme=http&region=us-east-1"
    cfg = PackConfig.model_validate(
        {"packing": {"seq_len": 64, "patch_size": 16}, "output": {"shard_rows": 1}}
    )

    def planner(source: str, c: PackConfig, epoch: int):
        proxy.cut()
        return make_plan(scan_source(source, c, use_ray=False), c, epoch)

    with pytest.raises(NavitError) as e:
        pack(str(src), out, cfg, workers=1, planner=planner)
    assert str(e.value) == (
        f"--out {out}: object store unreachable at http://127.0.0.1:{proxy.port} (curlCode: 7, Could not "
        "connect to server) (run the same command with --resume once it answers)"
    )
    proxy.restore()
    done = pack(str(src), out, cfg, workers=1, resume=True)
    assert done.shards_built >= 1
    assert schema.verify_shards(out, schema.read_index(out)) == []


def test_stats_reads_s3_by_environment_and_by_uri_options(packs, s3, monkeypatch, capsys):
    from cli.main import app

    local, _ = packs
    runner = CliRunner()
    want = json.loads(runner.invoke(app, ["stats", str(local), "--json"]).stdout)
    want.pop("dir")
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    res = runner.invoke(app, ["stats", OUT, "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got.pop("dir") == OUT and got == want
    # The same pack named with pyarrow URI options and no endpoint in the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    host = s3["AWS_ENDPOINT_URL"].split("://", 1)[1]
    uri = f"{OUT}?endpoint_override={host}&scheme=http"
    res = runner.invoke(app, ["stats", uri, "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    got.pop("dir")
    assert got == want


def _train(data: str, out: Path) -> list[float]:
    from cli.main import app

    args = ["train", "--data", data, "--out", str(out), "--steps", "3", "--batch-size", "2"]
    args += ["--device", "cpu", "--seed", "1", "--workers", "0", "--set", "schedule.warmup_steps=1"]
    args += ["--set", "model.overrides={depth: 1, dim: 32, heads: 2}", "--set", "log_every=1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def test_train_from_s3_sees_the_same_batches(packs, s3, tmp_path, monkeypatch):
    local, _ = packs
    want = _train(str(local), tmp_path / "run-local")
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    assert _train(OUT, tmp_path / "run-s3") == want and len(want) == 3


def test_serve_from_s3_to_a_flight_client(packs, s3):
    from trainer.flight_client import flight_batches

    local, _ = packs
    proc = subprocess.Popen(
        [*NAVIT, "serve", OUT, "--port", "0", "-q", "--verify"],
        cwd=ROOT,
        env=_env(s3),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on flight://127\.0\.0\.1:(\d+)", line)
        assert m, f"server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        got = pa.Table.from_batches(list(flight_batches(f"flight://127.0.0.1:{m.group(1)}", 0)))
    finally:
        proc.terminate()
        proc.wait(30)
    index = schema.read_index(str(local))
    want = pa.concat_tables(pq.read_table(local / e["file"]) for e in index["shards"])
    assert got.equals(want)


def test_checksums_are_verified_when_reading_from_s3(packs, s3, tmp_path, monkeypatch):
    """A shard object replaced behind the index's back (here: by another shard's bytes, still a valid
    Parquet file) is refused by train, in one line."""
    _, fs = packs
    for rel, data in _objects(fs, "navit-packs/p1").items():
        with fs.open_output_stream(f"navit-packs/tampered/{rel}") as o:
            o.write(data)
    with fs.open_input_stream("navit-packs/p1/shards/shard-000001.parquet") as f:
        other = f.read()
    with fs.open_output_stream("navit-packs/tampered/shards/shard-000000.parquet") as o:
        o.write(other)
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    from cli.main import app

    res = CliRunner().invoke(
        app, ["train", "--data", "s3://navit-packs/tampered", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code != 0
    assert "shard-000000.parquet: checksum mismatch" in str(res.exception), res.output


def test_resume_after_deleting_a_shard_object(packs, s3):
    """Runs last: it rewrites the bucket pack (index.json is removed while the resume runs)."""
    _, fs = packs
    before = _objects(fs, "navit-packs/p1")
    fs.delete_file("navit-packs/p1/shards/shard-000002.parquet")
    r = _navit(["pack", SRC, "--out", OUT, *PACK_ARGS, "--workers", "1", "--resume"], _env(s3))
    assert r.returncode == 0, r.stderr[-3000:]
    n = sum(1 for k in before if k.startswith("shards/"))
    assert f"1 built, {n - 1} verified and kept" in r.stdout
    assert _objects(fs, "navit-packs/p1") == before
