"""Starting or joining Ray. Embedded (local) by default, sized to the machine; ``--ray-address``
joins an existing cluster. Imported lazily: nothing in model/ or trainer/ imports Ray."""

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
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
    except ConnectionError as e:
        raise NavitError(f"cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    _quiet_ray_data()


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
