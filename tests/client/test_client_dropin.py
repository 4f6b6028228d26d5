"""Scripts written for the published client (tests/dropin/) run unchanged against ours.

Each script runs in a subprocess against the independent peer server; the slow variant runs
the very same scripts against the published `nomyo==0.2.9` in a throwaway venv, which shows
they really are written for the published API and not bent towards ours.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.peer_server import PeerServer

DROPIN = Path(ROOT) / "tests" / "dropin"
ERROR_STATUSES = (400, 401, 403, 404, 429, 500, 502, 503, 504)
API_KEY = "sk-dropin-key-0123"


def run_script(python: str, name: str, url: str, tmp_path: Path, ours: bool,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if ours:
        env["PYTHONPATH"] = str(ROOT)
    env.update(NOMYO_URL=url, NOMYO_TEST_API_KEY=API_KEY, **(extra_env or {}))
    args = [python, str(DROPIN / name)]
    if name in ("key_dir.py", "low_level.py"):
        args.append(str(tmp_path / "keys"))
    # cwd outside the repository so `import nomyo` resolves only through PYTHONPATH / the venv
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300, check=False)


def scenario(python: str, name: str, tmp_path: Path, ours: bool) -> None:
    """Run one script against a peer server prepared the way the script expects."""
    peer = PeerServer(api_key=API_KEY if name == "api_key.py" else None)
    try:
        if name == "errors.py":
            for status in ERROR_STATUSES:
                peer.inject(status, {"Content-Type": "application/json"},
                            {"detail": f"injected {status}"})
        result = run_script(python, name, peer.url, tmp_path, ours)
    finally:
        peer.close()
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    assert "OK" in result.stdout


SCRIPTS = ["plain_chat.py", "tools.py", "errors.py", "security_tier.py", "api_key.py",
           "key_dir.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_dropin_script_runs_against_ours(name, tmp_path):
    scenario(sys.executable, name, tmp_path, ours=True)


def test_dropin_low_level_script_runs_against_ours(tmp_path):
    scenario(sys.executable, "low_level.py", tmp_path, ours=True)


def test_plain_chat_script_against_our_server(tmp_path):
    from nomyo.server import start_background

    with start_background(backend="echo") as handle:
        result = run_script(sys.executable, "plain_chat.py", handle.url, tmp_path, ours=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def published_python(tmp_path_factory) -> str:
    """A throwaway venv with the published client from PyPI."""
    where = tmp_path_factory.mktemp("published")
    venv.create(where, with_pip=True)
    python = str(where / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "nomyo==0.2.9"],
                             capture_output=True, text=True, timeout=600, check=False)
    if install.returncode != 0:
        pytest.fail(f"could not install nomyo==0.2.9 from the package index:\n{install.stderr}")
    return python


@pytest.mark.slow
@pytest.mark.parametrize("name", [*SCRIPTS, "low_level.py"])
def test_dropin_script_runs_against_the_published_client(name, tmp_path, published_python):
    scenario(published_python, name, tmp_path, ours=False)
