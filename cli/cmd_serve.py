"""`navit serve`: stream packed rows over Arrow Flight to trainers on other machines.

``navit serve DIR`` serves an existing pack; ``navit serve SOURCE [pack flags]`` runs the live packing
pipeline (plan + Ray, nothing written). ``navit serve --status`` asks a running server what it is doing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from cli import common
from packer.errors import ConfigError, DataError


def _is_pack_dir(path: str) -> bool:
    if "://" in path:  # s3:// or gs:// pack directories; tar shards / Parquet files are a source
        from packer.plan.containers import names_containers

        return not names_containers(path)
    p = Path(path)
    # An unfinished pack (shards but no index.json yet) is a pack DIR too: read_index says why it
    # cannot be served, instead of trying to pack its shards as images.
    return (p / "index.json").is_file() or (p / "shards").is_dir() or (p / "images.parquet").is_file()


def _read_file(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        source: Annotated[
            str | None,
            typer.Argument(help="a pack directory (index.json) or a raw image SOURCE for live packing"),
        ] = None,
        host: Annotated[str, typer.Option("--host", help="interface to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="TCP port (0 = any free port)")] = 8815,
        token_file: Annotated[
            Path | None,
            typer.Option("--token-file", help="shared secret; required to listen beyond loopback"),
        ] = None,
        tls_cert: Annotated[
            Path | None, typer.Option("--tls-cert", help="PEM certificate chain (enables TLS)")
        ] = None,
        tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key")] = None,
        verify: Annotated[
            bool, typer.Option("--verify", help="re-hash every shard (sha256) before serving")
        ] = False,
        status: Annotated[
            bool, typer.Option("--status", help="print the status of the server at --host/--port and exit")
        ] = False,
        json_out: Annotated[bool, typer.Option("--json", help="--status: print one JSON object")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-stream log lines")] = False,
        max_streams: Annotated[
            int, typer.Option("--max-streams", help="streams served at once; more are refused (0 = no cap)")
        ] = 64,
        idle_timeout: Annotated[
            float,
            typer.Option(
                "--idle-timeout",
                help="seconds a client may not read before its stream is cancelled (0 = never)",
            ),
        ] = 300.0,
        config: common.ConfigOpt = None,
        seq_len: common.SeqLenOpt = None,
        patch_size: common.PatchOpt = None,
        max_images_per_seq: common.MaxImagesOpt = None,
        max_tokens_per_image: common.MaxTokensOpt = None,
        seed: common.SeedOpt = None,
        resolution: common.ResolutionOpt = None,
        token_drop: common.TokenDropOpt = None,
        packer: common.PackerOpt = None,
        exact_fill: common.ExactFillOpt = None,
        sets: common.SetOpt = None,
        workers: common.WorkersOpt = None,
        ray_address: common.RayAddressOpt = None,
    ) -> None:
        """Serve packed rows over Arrow Flight: a pack DIR, or live packing of SOURCE (see docs/serve.md)."""
        from trainer.flight_client import read_token_file

        token = read_token_file(token_file) if token_file else None
        if status:
            _print_status(host, port, token, _read_file(tls_cert, "--tls-cert"), json_out)
            return
        if source is None:
            raise ConfigError("give a pack DIR or an image SOURCE to serve (or --status)")

        from packer.serve.epochs import LiveSource, ShardSetSource
        from packer.serve.flight import make_server

        stop = _StopOnSignal()  # before Ray starts: a signal during start-up is one line too
        if _is_pack_dir(source):
            _refuse_packing_options(source, locals())
            src = ShardSetSource(source, verify=verify)
            what = f"pack {source} ({_epochs_line(src.describe())})"
        else:
            if not Path(source).exists():
                raise DataError(f"{source}: no such file or directory")
            cfg = common.pack_config_from_flags(config, **common.pack_flags(locals()))
            src = LiveSource(source, cfg, ray_address=ray_address, workers=workers)
            from packer.ray_runtime import ensure_ray

            # Ray starts here, in the main thread, rather than on the first client's thread: started
            # elsewhere it cannot set its signal handling, and its C++ handler then printed a stack
            # dump on SIGTERM. Ours are installed again after it.
            ensure_ray(ray_address, workers)
            stop.install()
            what = f"live packing of {source} (seed {cfg.seed}, any epoch)"

        server = make_server(
            src,
            host=host,
            port=port,
            token=token,
            tls_cert=_read_file(tls_cert, "--tls-cert"),
            tls_key=_read_file(tls_key, "--tls-key"),
            max_streams=max_streams,
            idle_timeout_s=idle_timeout,
        )
        if not quiet:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
            logging.getLogger("navit.serve").setLevel(logging.INFO)
        scheme = "flight+tls" if tls_cert else "flight"
        auth = "token required" if token else "no token (loopback only)"
        # The first stdout line names the real port (useful with --port 0); flush for pipes.
        typer.echo(f"navit serve: listening on {scheme}://{host}:{server.port} — {what}; {auth}")
        sys.stdout.flush()
        signum = stop.wait()  # the server runs on gRPC's threads; this one waits for Ctrl-C / SIGTERM
        cancelled, finished = server.stop()
        st = server.state.snapshot()
        typer.echo(
            f"navit serve: stopped; {st['rows_served']} rows, {st['bytes_served'] / 1e9:.2f} GB served "
            f"in {st['streams_completed']} complete streams ({st['streams_aborted']} ended early); "
            f"{signal.Signals(signum).name}: {cancelled} open stream(s) cancelled"
        )
        sys.stdout.flush()
        code = 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, as shells and schedulers expect
        if not finished:
            # A stream still waiting on its source (a live shard being built) keeps the server's
            # shutdown from returning; exiting closes its connection all the same.
            _shutdown_ray()
            sys.stderr.flush()
            os._exit(code)
        _shutdown_ray()
        raise typer.Exit(code)


# Options of live serving only: with a pack DIR they would be silently ignored.
_LIVE_ONLY = {
    "config": "--config",
    "sets": "--set",
    "seq_len": "--seq-len",
    "patch_size": "--patch-size",
    "max_images_per_seq": "--max-images-per-seq",
    "max_tokens_per_image": "--max-tokens-per-image",
    "seed": "--seed",
    "resolution": "--resolution",
    "token_drop": "--token-drop",
    "packer": "--packer",
    "exact_fill": "--exact-fill",
}


def _refuse_packing_options(source: str, values: dict) -> None:
    for name, flag in _LIVE_ONLY.items():
        if values.get(name) is not None:
            raise ConfigError(
                f"{flag}: {source} is a pack, served as it was packed; packing options apply only to "
                "live serving of an image SOURCE"
            )


class _StopOnSignal:
    """Waits in the main thread for SIGINT or SIGTERM (Flight serves on its own threads)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum = 0
        self.install()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        self._event.set()

    def wait(self) -> int:
        while not self._event.wait(0.5):  # a timed wait lets the handler run promptly
            pass
        return self.signum


def _shutdown_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _epochs_line(desc: dict) -> str:
    rows = desc.get("rows_per_epoch", {})
    return ", ".join(f"epoch {e}: {n} rows" for e, n in rows.items())


_STATUS_FIELDS = (
    "streams_streaming",
    "streams_stalled",
    "streams_producing",
    "streams_timed_out",
    "streams_refused",
    "hosts_connected",
)


def _print_status(host: str, port: int, token: str | None, tls_root: bytes | None, as_json: bool) -> None:
    from trainer.flight_client import FlightDataClient

    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
    scheme = "flight+tls" if tls_root else "flight"
    uri = f"{scheme}://{connect_host}:{port}"
    with FlightDataClient(uri, token=token, tls_root_cert=tls_root, action_timeout_s=30) as c:
        st = c.status()
    if as_json:
        typer.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    g = {k: st.get(k, "?") for k in _STATUS_FIELDS}  # "?": a server from before the field existed
    typer.echo(
        f"up {st['uptime_s']:.0f} s; {st['rows_served']} rows, {st['bytes_served'] / 1e9:.2f} GB served; "
        f"streams {g['streams_streaming']} streaming, {g['streams_stalled']} stalled, "
        f"{g['streams_producing']} producing (cap {st.get('max_streams') or 'none'}); "
        f"{st['streams_completed']} done, {st['streams_aborted']} ended early "
        f"({g['streams_timed_out']} timed out), {g['streams_refused']} refused; clients "
        f"{st['clients_connected']} connected from {g['hosts_connected']} host(s), {st['clients_seen']} seen"
    )
    for s in st["streams_in_progress"]:
        state = f"stalled {s['idle_s']:.0f} s" if s.get("state") == "stalled" else s.get("state", "")
        typer.echo(
            f"  #{s['id']} {s['peer']}  epoch {s['epoch']} rank {s['rank']}/{s['world_size']}  {state}  "
            f"{s['rows_sent']}/{s['rows_total']} rows  {s['bytes_sent'] / 1e6:.1f} MB  {s['seconds']:.0f} s"
        )
