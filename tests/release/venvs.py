"""What the release tests share: a copy of the source as git sees it, fresh virtual
environments, and an environment in which no C compiler can be found."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

# variables that would point a child at this checkout, another compiler or another backend
_DROPPED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CC", "CXX", "LDSHARED", "CFLAGS",
            "NOMYO_MEMORY_BACKEND", "NOMYO_SECURE_ALLOCATOR", "NOMYO_REQUIRE_SECURE_MEMORY",
            "NOMYO_PORTABLE_GLIBC")


def run(cmd: list, *, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, **kw)


def source_files() -> list[str]:
    """The repository's files as git sees them: tracked, plus new ones not ignored."""
    if shutil.which("git") is None:
        pytest.skip("git not installed (Debian package git): it lists the source files")
    listing = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                  cwd=ROOT)
    if listing.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: {listing.stderr.strip()}")
    return sorted(p for p in set(listing.stdout.split("\0"))
                  if p and os.path.isfile(os.path.join(ROOT, p)))


def source_tree(dest: Path) -> Path:
    """A clean copy of the working tree (no build products, no venvs), to build or install."""
    for rel in source_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dest / rel)
    return dest


def fresh_venv(path: Path) -> Path:
    """A new venv from the running Python; returns its interpreter."""
    made = run([sys.executable, "-m", "venv", path], timeout=300)
    assert made.returncode == 0, made.stderr
    return path / "bin" / "python"


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env.update(extra)
    return env


def no_compiler_env(tmp_path: Path, python: Path, *, cc: str | None = None) -> dict:
    """PATH holds nothing but `python`, so neither gcc nor cc can be found; CC, when given,
    names the compiler setuptools would otherwise take from Python's build settings."""
    bin_dir = tmp_path / "no-compiler-bin"
    bin_dir.mkdir(exist_ok=True)
    link = bin_dir / "python"
    if not link.exists():
        link.symlink_to(python)
    env = clean_env(PATH=str(bin_dir))
    if cc is not None:
        env["CC"] = cc
    for name in ("gcc", "cc", "clang"):
        assert shutil.which(name, path=env["PATH"]) is None, f"{name} still on PATH"
    return env


def probe_backend(python: Path, cwd: Path, env: dict) -> dict:
    """What an installed nomyo reports about itself, from outside any source tree."""
    code = ("import json, nomyo, nomyo.protocol.b64; i = nomyo.get_memory_protection_info(); "
            "print(json.dumps({'backend': i['backend'], 'file': nomyo.__file__, "
            "'native_b64': nomyo.protocol.b64.NATIVE}))")
    probe = run([python, "-c", code], cwd=cwd, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout)
