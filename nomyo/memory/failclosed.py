"""Fail-closed mode, decided and worded in one place: when the process
(NOMYO_REQUIRE_SECURE_MEMORY=1) or a client (require_secure_memory=True) asks for it, no
secret is placed in memory that is not really locked and excluded from core dumps."""
from __future__ import annotations

import errno
import os

from nomyo.errors import SecureMemoryUnavailable
from nomyo.memory import limits, settings

ASKED = "secure memory is required (NOMYO_REQUIRE_SECURE_MEMORY=1 or require_secure_memory=True)"


def required(explicit: bool | None = None) -> bool:
    """Whether a new buffer must fail closed: `explicit` when given, else the process setting."""
    return settings.required() if explicit is None else explicit


def require_protection(locked: bool, dump_excluded: bool, *, lock_errno: int = 0) -> None:
    """SecureMemoryUnavailable, saying what is missing and how to grant it, unless memory
    locking and dump exclusion are both in force."""
    missing = []
    if not locked:
        limit = limits.memlock_limit()
        shown = "unlimited" if limit is None else f"{limit} bytes"
        reason = os.strerror(lock_errno) if lock_errno else "locking unavailable"
        if lock_errno in (errno.EPERM, errno.ENOMEM, errno.EAGAIN):
            reason += " (RLIMIT_MEMLOCK exhausted or no CAP_IPC_LOCK)"
        missing.append(
            f"memory locking is not in force ({reason}; the RLIMIT_MEMLOCK memlock limit is "
            f"{shown}): grant CAP_IPC_LOCK, raise the limit (ulimit -l, systemd "
            "LimitMEMLOCK=), or run the container with --ulimit memlock=-1 (or enough bytes "
            "for the buffers in use); `nomyo doctor` shows what this process can do"
        )
    if not dump_excluded:
        missing.append("memory cannot be excluded from core dumps (madvise MADV_DONTDUMP failed)")
    if missing:
        raise SecureMemoryUnavailable(f"{ASKED} but " + "; ".join(missing))


def require_native(fallback_reason: str | None) -> None:
    """The fallback backend never locks: refuse, naming why the native helper is missing."""
    raise SecureMemoryUnavailable(
        f"{ASKED} but the native helper is not available ({fallback_reason}); reinstall "
        "nomyo with a C compiler so that it builds"
    )
