"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits with code 2."""


class NavitError(Exception):
    """A user-facing error: bad input, bad flag, bad data directory. The message is one line."""


class ConfigError(NavitError):
    """An invalid configuration value; the message names the field and the allowed range."""


class DataError(NavitError):
    """A data directory that is missing, corrupt, or of an unknown format version."""


class Terminated(BaseException):
    """SIGTERM (a scheduler's or supervisor's stop), raised in the main thread by the handler the CLI
    installs. Not a KeyboardInterrupt: typer turns those into a silent exit 130, and a SIGTERM must
    end with its one line and exit code 143 (``except BaseException`` clean-ups run for both)."""


class Stopped(Exception):  # noqa: N818 - not an error: a run that stopped as asked
    """A run stopped by a signal after doing what it could (e.g. saving a checkpoint). The CLI prints
    the one-line message and exits with ``exit_code`` (128 + the signal number: 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
