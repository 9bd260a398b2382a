"""packer.ray_runtime's token discovery for `--ray-address HOST:PORT` (the cluster itself is tested in
tests/test_cluster.py): where the token is looked for, and that token mode is switched on — in Ray's
cached config too — only when the user has not chosen a mode and a token exists. Each case runs in
a fresh interpreter, so this process's Ray state is never touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import os; import ray; from ray._raylet import get_authentication_mode;"
    "from packer.ray_runtime import auth_token_source, enable_token_auth_if_available as enable;"
    "src = auth_token_source(); on = enable();"
    "print(src, on, os.environ.get('RAY_AUTH_MODE'), int(get_authentication_mode()))"
)


def _probe(home: Path, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(HOME=str(home), **env)
    r = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.fixture
def home_with_token(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 64)
    return tmp_path


def test_token_in_default_file_turns_token_mode_on(home_with_token):
    src, on, mode, ray_mode = _probe(home_with_token)
    assert src == str(home_with_token / ".ray" / "auth_token")
    assert (on, mode, ray_mode) == ("True", "token", "1")  # 1 = AuthenticationMode.TOKEN in Ray's config


def test_token_from_environment_variables(tmp_path):
    assert _probe(tmp_path, RAY_AUTH_TOKEN="b" * 64)[:3] == ["RAY_AUTH_TOKEN", "True", "token"]
    path = tmp_path / "tok"
    path.write_text("c" * 64)
    assert _probe(tmp_path, RAY_AUTH_TOKEN_PATH=str(path))[:3] == [
        f"RAY_AUTH_TOKEN_PATH={path}",
        "True",
        "token",
    ]


def test_no_token_or_an_explicit_mode_is_left_alone(tmp_path, home_with_token):
    bare = tmp_path / "bare-home"
    bare.mkdir()
    assert _probe(bare) == ["None", "False", "None", "0"]  # no token anywhere: Ray's default
    (bare / ".ray").mkdir()
    (bare / ".ray" / "auth_token").write_text("\n")  # an empty file is no token
    assert _probe(bare)[:2] == ["None", "False"]
    # The user's explicit choice wins over a token that exists.
    assert _probe(home_with_token, RAY_AUTH_MODE="disabled")[1:] == ["False", "disabled", "0"]
