"""Readings of the kernel limits that decide whether memory can be locked and dumped."""
from __future__ import annotations

import errno
import os
import resource


def _soft(limit: int) -> int | None:
    soft = resource.getrlimit(limit)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def memlock_limit() -> int | None:
    """Soft RLIMIT_MEMLOCK in bytes, None when unlimited."""
    return _soft(resource.RLIMIT_MEMLOCK)


def core_limit() -> int | None:
    """Soft RLIMIT_CORE in bytes, None when unlimited."""
    return _soft(resource.RLIMIT_CORE)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def locked_bytes() -> int | None:
    """This process's locked memory now (VmLck), None where /proc does not say."""
    kib = _proc_status_kib("VmLck")
    return None if kib is None else kib * 1024


def _read_sys(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def core_pattern_is_pipe() -> bool:
    """A piped core handler ignores RLIMIT_CORE 0, so the limit alone does not stop dumps."""
    return (_read_sys("/proc/sys/kernel/core_pattern") or "").startswith("|")


def suid_dumpable() -> int | None:
    value = _read_sys("/proc/sys/fs/suid_dumpable")
    return int(value) if value and value.isdigit() else None


def missing_protection_message(locked: bool, dump_excluded: bool, lock_errno: int) -> str:
    """What fail-closed mode found missing, and how an operator grants it."""
    missing = []
    if not locked:
        limit = memlock_limit()
        shown = "unlimited" if limit is None else f"{limit} bytes"
        reason = os.strerror(lock_errno) if lock_errno else "locking unavailable"
        if lock_errno in (errno.EPERM, errno.ENOMEM, errno.EAGAIN):
            reason += " (RLIMIT_MEMLOCK exhausted or no CAP_IPC_LOCK)"
        missing.append(
            f"memory cannot be locked: {reason}; RLIMIT_MEMLOCK memlock limit is {shown}. "
            "Grant CAP_IPC_LOCK, raise the limit (ulimit -l, systemd LimitMEMLOCK=), or run the "
            "container with --ulimit memlock=-1 (or enough bytes for the buffers in use)"
        )
    if not dump_excluded:
        missing.append("memory cannot be excluded from core dumps (madvise MADV_DONTDUMP failed)")
    return (
        "secure memory is required (NOMYO_REQUIRE_SECURE_MEMORY=1) but " + "; ".join(missing)
    )
