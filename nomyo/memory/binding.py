"""The one binding layer: loads the compiled helpers once, checks they belong to this nomyo,
and wraps every C call in a checked function. No other module touches `ffi` or `lib`.

Nothing is compiled here: the modules are built at install time. When they are missing or
stale (built for another nomyo version), or `NOMYO_MEMORY_BACKEND=fallback` forces it (for
tests and diagnosis), the fallback backend is used and every report says why.
"""
from __future__ import annotations

import logging
import os
import warnings
from types import ModuleType
from typing import Any

from nomyo._version import __version__
from nomyo.memory import settings

log = logging.getLogger("nomyo.memory")

_ffi: Any = None
_lib: Any = None
# nomyo._pyobjects: Region (which owns its nm_region: secmem.c is linked into it too, so
# its allocation, refit and release run under the GIL), the wipers, the JSON and UTF-8 helpers
pyobjects: Any = None
FALLBACK_REASON: str | None = None


def stale_build(name: str, built_for: str | None) -> str | None:
    """Why a compiled module cannot be used with this package, or None when it can
    (`built_for` is the version stamped into it; None when it carries no stamp)."""
    if built_for == __version__:
        return None
    made = f"built for nomyo {built_for}" if built_for else "built with no version stamp"
    return (f"{name} was {made}, this is nomyo {__version__}: a stale build; reinstall "
            "nomyo (pip install --force-reinstall) to rebuild it")


def _load() -> None:
    global _ffi, _lib, pyobjects
    if settings.fallback_forced():
        raise ImportError("forced by NOMYO_MEMORY_BACKEND=fallback")
    from nomyo import _pyobjects
    from nomyo._secmem import ffi, lib

    stamp = ffi.string(lib.nm_build_version()).decode("ascii") if hasattr(
        lib, "nm_build_version") else None
    stale = (stale_build("nomyo._secmem", stamp)
             or stale_build("nomyo._pyobjects", getattr(_pyobjects, "BUILD_VERSION", None)))
    if stale:
        raise ImportError(stale)
    _ffi, _lib, pyobjects = ffi, lib, _pyobjects


try:
    _load()
except ImportError as exc:
    FALLBACK_REASON = str(exc)
    log.warning("nomyo native secure memory unavailable, using the fallback backend: %s", exc)
    if not settings.fallback_forced():
        # weaker protection must never be silent, even where logging is not configured (the
        # nomyo logger has a NullHandler): a warning reaches stderr by default
        warnings.warn(f"nomyo native secure memory unavailable, using the fallback backend "
                      f"(not locked, not excluded from dumps): {exc}",
                      RuntimeWarning, stacklevel=2)

BACKEND = "native" if _lib is not None else "fallback"
CANARY_BYTES = _lib.NM_CANARY_BYTES if _lib is not None else 0


def check_errno(rc: int, what: str) -> None:
    """The one place C return codes (0 or -errno) become Python exceptions."""
    if rc == 0:
        return
    err = -rc
    if err == 12:  # ENOMEM
        raise MemoryError(f"{what}: {os.strerror(err)}")
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _allocator_flags() -> int:
    """Read the allocator switch once: NOMYO_SECURE_ALLOCATOR=mmap skips memfd_secret."""
    if _lib is None:
        return 0
    choice = os.environ.get("NOMYO_SECURE_ALLOCATOR", "auto").strip().lower()
    if choice == "mmap":
        return _lib.NM_FLAG_FORCE_MMAP
    if choice not in ("", "auto", "memfd_secret"):
        log.warning("NOMYO_SECURE_ALLOCATOR=%r is not auto|memfd_secret|mmap; using auto", choice)
    return 0


_ALLOCATOR_FLAGS = _allocator_flags()


def region_flags(*, lock: bool) -> int:
    """nm_region_alloc's flags for a new Region: the allocator switch, and whether to lock."""
    return _ALLOCATOR_FLAGS | (0 if lock else _lib.NM_FLAG_NO_LOCK)


def fill_random(view: memoryview) -> None:
    """Overwrite a writable buffer with bytes from the kernel CSPRNG, in place."""
    check_errno(_lib.nm_fill_random(_ffi.from_buffer(view), len(view)), "getrandom failed")


def get_dumpable() -> int | None:
    """The process dumpable flag (prctl PR_GET_DUMPABLE); None where it cannot be read."""
    if _lib is None:
        return None
    value = _lib.nm_get_dumpable()
    return value if value >= 0 else None


def set_dumpable(value: int) -> bool:
    """Set the dumpable flag; False (nothing done) on the fallback backend."""
    if _lib is None:
        return False
    check_errno(_lib.nm_set_dumpable(value), f"prctl(PR_SET_DUMPABLE, {value}) failed")
    return True


def native_module(name: str) -> tuple[ModuleType | None, str | None]:
    """Another compiled helper of this package (e.g. `_b64`), or None and why not."""
    if settings.fallback_forced():
        return None, "forced by NOMYO_MEMORY_BACKEND=fallback"
    try:
        module = __import__(f"nomyo.{name}", fromlist=["BUILD_VERSION"])
    except ImportError as exc:
        return None, str(exc)
    stale = stale_build(f"nomyo.{name}", getattr(module, "BUILD_VERSION", None))
    return (None, stale) if stale else (module, None)


# How much stack below the caller `scrub` zeroes: the deepest spill seen in the residue check
# (security/test_stack_residue.py) with room to spare; bench/bench_memory.py prints its cost.
SCRUB_STACK_BYTES = 64 << 10


def scrub() -> int:
    """Clear the vector registers and zero a stretch of stack below this call, so that a
    secret an operation just moved (memmove leaves it in a vector register, and the lazy
    binding trampoline spills those to the stack) does not outlive it there. The bytes of
    stack zeroed; 0 on the fallback backend, which cannot do it."""
    if _lib is None:
        return 0
    return int(_lib.nm_scrub(SCRUB_STACK_BYTES))


def copy_scrub(dst: memoryview, src: Any) -> None:
    """Copy the bytes of `src` into `dst` (same length) in C, then `scrub`: the one way the
    library copies a secret. The fallback backend copies in Python and cannot scrub."""
    with memoryview(src) as view:
        if view.nbytes != dst.nbytes:
            raise ValueError(f"copy of {view.nbytes} bytes into a buffer of {dst.nbytes}")
        if _lib is None:
            dst[:] = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            return
        check_errno(_lib.nm_copy_scrub(_ffi.from_buffer(dst), _ffi.from_buffer(view),
                                       view.nbytes, SCRUB_STACK_BYTES),
                    "secure copy failed")
