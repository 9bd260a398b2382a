"""Starting or joining Ray. Embedded (local) by default, sized to the machine; ``--ray-address``
joins an existing cluster. Imported lazily: nothing in model/ or trainer/ imports Ray.

Token authentication: Ray (2.59+) turns it on for clusters started on a machine that has a token,
and a driver joining with ``address="auto"`` picks that token up by itself, but one joining with an
explicit ``HOST:PORT`` only sends a token when ``RAY_AUTH_MODE=token`` is set (Ray 2.60), so it was
refused with "Authentication token is missing or incorrect". :func:`enable_token_auth_if_available`
closes that gap: when the user has not chosen a mode and a token is where Ray looks for one
(``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``), the driver
joins in token mode. A cluster without authentication ignores the token."""

from __future__ import annotations

import logging
import os

from packer.errors import NavitError


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process. A session that is already up (e.g. the test suite's) is reused."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    if address:
        enable_token_auth_if_available()
    keep = _python_signal_handlers()
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
    except _join_errors(ray) as e:
        raise NavitError(
            f"cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]} (auth token used: "
            f"{auth_token_source() or 'none found'}; a cluster with token authentication needs the "
            f"head's token in RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        ) from None
    finally:
        _restore_signal_handlers(keep)
    _quiet_ray_data()


def _python_signal_handlers() -> dict[int, object]:
    """The Python handlers set for SIGTERM/SIGINT (e.g. the CLI's one-line SIGTERM exit). Ray's core
    worker installs its own C-level handler for SIGTERM in ``ray.init`` — a stack dump and abort
    (exit 134) in place of the caller's clean stop — so they are put back after it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    wanted = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if callable(handler) and handler is not signal.default_int_handler:
            wanted[sig] = handler
    return wanted


def _restore_signal_handlers(handlers: dict[int, object]) -> None:
    import signal

    for sig, handler in handlers.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


def _join_errors(ray) -> tuple[type[BaseException], ...]:
    # ray.exceptions.AuthenticationError exists from Ray 2.52 (token authentication) on.
    auth = getattr(ray.exceptions, "AuthenticationError", None)
    return (ConnectionError, auth) if auth is not None else (ConnectionError,)


def auth_token_source() -> str | None:
    """Where Ray would read an auth token from, in Ray's order of precedence (``RAY_AUTH_TOKEN``,
    then the file ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``), or None if there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        # Ray treats an unreadable RAY_AUTH_TOKEN_PATH as fatal; report it as the source and let it say so.
        return f"RAY_AUTH_TOKEN_PATH={path}"
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(default, encoding="utf-8") as f:
            return default if f.read().strip() else None
    except OSError:
        return None


def enable_token_auth_if_available() -> bool:
    """Join an explicit ``HOST:PORT`` in token mode when a token is available and ``RAY_AUTH_MODE``
    is unset (see the module docstring). Must run before ``ray.init``. Returns whether token mode is on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"  # the user's explicit choice wins
    if auth_token_source() is None:
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    # Ray caches its config (auth mode included) when it is imported; re-read the environment, as
    # Ray itself does when it turns token mode on for `auto`.
    import ray._raylet

    config = getattr(ray._raylet, "Config", None)
    if config is not None and hasattr(config, "initialize"):
        config.initialize("")
    return True


def _quiet_ray_data() -> None:
    """Ray Data prints its own progress bars and operator logs; navit reports progress itself."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True


def available_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
