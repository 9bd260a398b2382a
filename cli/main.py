"""The `navit` command. Each sub-command lives in its own module (cli/cmd_*.py) and registers itself;
heavy imports (Ray, torch) happen inside the commands so `navit --help` stays fast."""

from __future__ import annotations

import importlib
import signal
import sys

import typer

from packer.errors import NavitError, Stopped, Terminated

app = typer.Typer(
    name="navit",
    help="Patch n' Pack: pack native-resolution images into fixed-length sequences and train NaViT on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Patch n' Pack for native-resolution ViTs: synth, plan, pack, stats, inspect, train, eval, embed,
    export, serve."""


# Order here is the order in `navit --help`.
COMMAND_MODULES = (
    "cli.cmd_synth",
    "cli.cmd_plan",
    "cli.cmd_pack",
    "cli.cmd_stats",
    "cli.cmd_inspect",
    "cli.cmd_train",
    "cli.cmd_eval",
    "cli.cmd_embed",
    "cli.cmd_export",
    "cli.cmd_serve",
    "cli.cmd_doctor",
)

for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as _e:  # a command not built yet
        if _e.name != _name:
            raise
        continue
    _mod.register(app)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2; SIGTERM
    one line and exit code 143, as a shell reports a process it stopped (commands may say what they kept)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except NavitError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except Terminated as e:
        typer.secho(f"terminated (SIGTERM): {e.args[0]}" if e.args else "terminated (SIGTERM)", err=True)
        sys.exit(143)
    except Stopped as e:  # stopped by a signal after saving what it could: one line, 128 + signum
        typer.secho(str(e), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # (typer already turns Ctrl-C inside a command into exit 130)
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
