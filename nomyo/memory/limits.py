"""Readings of the kernel limits that decide whether memory can be locked and dumped."""
from __future__ import annotations

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
