"""Shared fixtures. Ray is started once per test session (it takes 5-15 s) and only by tests that
ask for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    """An embedded 2-CPU Ray shared by every test that needs it."""
    import ray

    from packer.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
