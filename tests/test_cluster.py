"""`navit pack` on a real two-node Ray cluster with token authentication (issue 13).

A head and a second node are started on this machine with `ray start` (their own ports, temp folder
and token; see tests/local_ray_cluster.py); `navit pack` runs as a separate process, as a user would
run it, and joins once by ``HOST:PORT`` and once by ``auto``. The output must be byte-identical to
the embedded run, every shard must have been built on one of the cluster's two nodes and both must
have built some, and afterwards exactly the cluster's processes are gone (the suite's own embedded
Ray still answers).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from local_ray_cluster import LocalRayCluster
from typer.testing import CliRunner

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # two `ray start` nodes + 3 packs: ~60 s on 2 cores

ROOT = Path(__file__).resolve().parents[1]
PACK_ARGS = ["--seq-len", "64", "--patch-size", "16", "--resolution", "uniform:32:96", "--shard-rows", "1"]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def navit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def shards_per_node(summary: str) -> dict[str, int]:
    """The pack summary's 'ray nodes' line: node id prefix -> shards built there."""
    line = re.search(r"^  ray nodes +\d+ built shards: (.*)$", summary, re.M)
    assert line, summary
    return {node: int(n) for node, n in (part.split() for part in line.group(1).split(", "))}


def test_pack_on_an_authenticated_two_node_cluster(tmp_path, ray_session):
    from cli.main import app
    from packer.synth import generate

    generate(tmp_path / "img", n=40, seed=3, threads=1)
    src = str(tmp_path / "img")
    # The reference: the same pack on the embedded Ray (the suite's session, in this process).
    ref = tmp_path / "embedded"
    res = CliRunner().invoke(app, ["pack", src, "--out", str(ref), *PACK_ARGS])
    assert res.exit_code == 0, res.output
    n_shards = len(list((ref / "shards").iterdir()))
    assert n_shards >= 6  # enough tasks for two 1-CPU nodes to share

    with LocalRayCluster(nodes=2, cpus_per_node=1) as cluster:
        nodes = cluster.node_ids()
        assert sorted(nodes.values()) == ["head", "worker"]
        # The token is where Ray looks by default (~/.ray/auth_token of this HOME); RAY_AUTH_MODE is
        # not set for navit: joining by HOST:PORT must find and use the token by itself.
        for how, address in (("hostport", cluster.address), ("auto", "auto")):
            out = tmp_path / how
            env = cluster.env()
            assert "RAY_AUTH_MODE" not in env
            r = navit(["pack", src, "--out", str(out), *PACK_ARGS, "--ray-address", address], env)
            assert r.returncode == 0, f"{how}: {r.stderr[-3000:]}"
            assert tree(out) == tree(ref), how  # shards, index.json, images.parquet, sidecars: all equal
            built = shards_per_node(r.stdout)
            assert sum(built.values()) == n_shards
            full = {prefix: [n for n in nodes if n.startswith(prefix)] for prefix in built}
            assert all(len(v) == 1 for v in full.values()), (built, nodes)  # only this cluster's nodes
            assert {nodes[v[0]] for v in full.values()} == {"head", "worker"}, (how, built, nodes)
        procs = cluster.processes()
        assert procs  # the sessions are found (so the check below means something)
    assert cluster.processes() == []  # every process the test started is gone
    assert ray_session.get(ray_session.remote(lambda: 7).remote()) == 7  # and the suite's Ray is not
