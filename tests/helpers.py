"""Subprocess helpers: crash-type and process-wide checks never run in the pytest process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("NOMYO_MEMORY_BACKEND", "NOMYO_SECURE_ALLOCATOR", "NOMYO_REQUIRE_SECURE_MEMORY"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_python(code: str, *, prefix: list | None = None, timeout: float = 60,
               check: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter (optionally behind setpriv/prlimit)."""
    cmd = list(prefix or []) + [sys.executable, "-c", textwrap.dedent(code)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**env), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package {package})")
    return path


NO_IPC_LOCK = ["setpriv", "--bounding-set=-ipc_lock", "prlimit", "--memlock=0:0"]


def unprivileged_prefix() -> list:
    """Run a child the way a hardened container does: no CAP_IPC_LOCK, memlock limit 0."""
    require_tool("setpriv", "util-linux")
    require_tool("prlimit", "util-linux")
    probe = subprocess.run(NO_IPC_LOCK + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop CAP_IPC_LOCK here (setpriv: {probe.stderr.strip()})")
    return NO_IPC_LOCK


def wait_until(predicate: Callable[[], object], seconds: float = 30.0) -> None:
    """Poll `predicate` until it holds; fail the test when `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
