"""A real multi-node Ray cluster on this machine, for tests: `ray start --head` plus `ray start
--address` nodes, each its own process tree, with Ray's token authentication on.

Isolation from any other Ray on the machine (the test suite's embedded one, a user's cluster):
- every port is a free one picked here (GCS, dashboard, dashboard agent), never Ray's defaults;
- ``RAY_TMPDIR`` points at a private, short folder (AF_UNIX socket paths must stay under 108 bytes),
  so the session files, sockets and ``ray_current_cluster`` (what ``--ray-address auto`` reads) are
  this cluster's only;
- ``HOME`` points at a private folder holding the cluster's token in ``~/.ray/auth_token``, so the
  user's own token file is neither read nor written.

Stopping: each `ray start` runs in a new session (``start_new_session``); every daemon it spawns
(GCS, raylet, agents, and the raylet's workers, which change process group but cannot leave the
session) keeps that session id. :meth:`LocalRayCluster.stop` signals exactly the processes of those
sessions — never `ray stop`, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

RAY_BIN = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """``with LocalRayCluster(nodes=2) as c:`` — a head and ``nodes - 1`` workers, 1 CPU each."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1) -> None:
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.root = Path(tempfile.mkdtemp(prefix="nvray-", dir="/tmp"))
        self.home = self.root / "home"
        self.token_file = self.home / ".ray" / "auth_token"
        self.ray_tmpdir = self.root / "t"
        self.port = free_port()
        self.sessions: list[int] = []  # session id (= pid of its `ray start`) of each node

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of this cluster's processes (and of drivers meant to find it by `auto`):
        private HOME (token) and RAY_TMPDIR; nothing inherited that points at another cluster."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        }
        env.update(HOME=str(self.home), RAY_TMPDIR=str(self.ray_tmpdir), RAY_USAGE_STATS_ENABLED="0")
        env.update(extra)
        return env

    def _ray_start(self, args: list[str]) -> None:
        # RAY_AUTH_MODE=token on every node: Ray 2.60 turns token mode on for a head by itself when a
        # token exists, but not for a node joining by address.
        cmd = [RAY_BIN, "start", *args, f"--num-cpus={self.cpus}", "--node-ip-address=127.0.0.1"]
        cmd += [f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        proc = subprocess.Popen(
            cmd,
            env=self.env(RAY_AUTH_MODE="token"),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")

    def start(self) -> LocalRayCluster:
        self.token_file.parent.mkdir(parents=True)
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.ray_tmpdir.mkdir()
        self._ray_start(
            ["--head", f"--port={self.port}", "--include-dashboard=false", f"--dashboard-port={free_port()}"]
        )
        for _ in range(self.nodes - 1):
            self._ray_start([f"--address={self.address}"])
        return self

    def node_ids(self) -> dict[str, str]:
        """Node id -> 'head' | 'worker', from the session folder's per-node port files (named
        ``<kind>_port_<node id>``; only the head runs the GCS)."""
        session = self.ray_tmpdir / "ray" / "session_latest"
        ids: dict[str, str] = {}
        for f in session.iterdir():
            if f.name.startswith("metrics_export_port_"):
                ids[f.name.rsplit("_", 1)[1]] = "worker"
        for f in session.iterdir():
            if f.name.startswith("gcs_server_port_"):
                ids[f.name.rsplit("_", 1)[1]] = "head"
        return ids

    def processes(self) -> list[psutil.Process]:
        """Live (non-zombie) processes of this cluster's sessions."""
        mine = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) in self.sessions and p.status() != psutil.STATUS_ZOMBIE:
                    mine.append(p)
            except (OSError, psutil.Error):
                continue  # exited meanwhile, or not ours to inspect
        return mine

    def stop(self, grace_s: float = 5.0) -> None:
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:  # the GCS ignores SIGTERM for a while
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
