"""Secure memory: guarded buffers, wiping of forced copies, the protection report, hardening.

This layer depends on nothing above it; the envelope, keys, client and server build on it.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nomyo.memory import _native, secure_json
from nomyo.memory.buffer import SecureBuffer
from nomyo.memory.hardening import harden_process
from nomyo.memory.report import MemoryProtectionLevel, get_memory_protection_info
from nomyo.memory.settings import disable_secure_memory, enable_secure_memory

if _native.pyobjects is not None:
    # Exported as the C functions themselves: a Python wrapper would add a reference and
    # every wipe would be refused as "still referenced elsewhere".
    wipe_bytes = _native.pyobjects.wipe_bytes
    wipe_str = _native.pyobjects.wipe_str
else:

    def wipe_bytes(obj: bytes) -> bool:
        """Fallback backend: immutable objects cannot be wiped; returns False."""
        return False

    def wipe_str(obj: str) -> bool:
        """Fallback backend: immutable objects cannot be wiped; returns False."""
        return False


@contextmanager
def secure_bytearray(data: Any) -> Iterator[SecureBuffer]:
    """Move data into secure memory for the block: the caller's bytearray is wiped at once,
    the yielded buffer (`.data` is a writable view) is wiped and released on exit."""
    buf = SecureBuffer.copy_of(data)
    if isinstance(data, bytearray):
        data[:] = bytes(len(data))
    try:
        yield buf
    finally:
        if not buf.closed:
            buf.close()


@contextmanager
def secure_bytes(data: Any) -> Iterator[SecureBuffer]:
    """Deprecated alias of secure_bytearray, kept for code written for the published client."""
    warnings.warn("secure_bytes is deprecated; use secure_bytearray", DeprecationWarning,
                  stacklevel=3)
    with secure_bytearray(data) as buf:
        yield buf


__all__ = [
    "MemoryProtectionLevel",
    "SecureBuffer",
    "disable_secure_memory",
    "enable_secure_memory",
    "get_memory_protection_info",
    "harden_process",
    "secure_bytearray",
    "secure_bytes",
    "secure_json",
    "wipe_bytes",
    "wipe_str",
]
