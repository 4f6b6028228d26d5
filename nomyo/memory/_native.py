"""Binding layer: loads the compiled helpers once and turns C results into Python errors.

Nothing is compiled here: the modules are built at install time. When they are missing
(or `NOMYO_MEMORY_BACKEND=fallback` forces it, for tests and diagnosis) the fallback backend is
used and every report says so.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from nomyo.memory import settings

log = logging.getLogger("nomyo.memory")

ffi: Any = None
lib: Any = None
pyobjects: Any = None
FALLBACK_REASON: str | None = None
ABI_VERSION = 2  # must equal NM_ABI_VERSION (csrc/secmem.h)
PYOBJECTS_ABI_VERSION = 3  # must equal ABI_VERSION in csrc/pyobjects.c

try:
    if settings.fallback_forced():
        raise ImportError("forced by NOMYO_MEMORY_BACKEND=fallback")
    from nomyo import _pyobjects as pyobjects
    from nomyo._secmem import ffi, lib

    if lib.NM_ABI_VERSION != ABI_VERSION or pyobjects.ABI_VERSION != PYOBJECTS_ABI_VERSION:
        raise ImportError("compiled helpers are from another nomyo build; reinstall nomyo")
except ImportError as exc:  # exotic platform or a source checkout that was never built
    ffi = lib = pyobjects = None
    FALLBACK_REASON = str(exc)
    log.warning("nomyo native secure memory unavailable, using the fallback backend: %s", exc)

BACKEND = "native" if lib is not None else "fallback"


def _allocator_flags() -> int:
    """Read the allocator switch once: NOMYO_SECURE_ALLOCATOR=mmap skips memfd_secret."""
    if lib is None:
        return 0
    choice = os.environ.get("NOMYO_SECURE_ALLOCATOR", "auto").strip().lower()
    if choice == "mmap":
        return lib.NM_FLAG_FORCE_MMAP
    if choice not in ("", "auto", "memfd_secret"):
        log.warning("NOMYO_SECURE_ALLOCATOR=%r is not auto|memfd_secret|mmap; using auto", choice)
    return 0


ALLOCATOR_FLAGS = _allocator_flags()


def check_errno(rc: int, what: str) -> None:
    """The one place C return codes (0 or -errno) become Python exceptions."""
    if rc == 0:
        return
    err = -rc
    if err == 12:  # ENOMEM
        raise MemoryError(f"{what}: {os.strerror(err)}")
    raise OSError(err, f"{what}: {os.strerror(err)}")
