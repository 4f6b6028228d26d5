"""Secure memory: guarded buffers, wiping of forced copies, the protection report, hardening.

This layer depends on nothing above it; the envelope, keys, client and server build on it.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from nomyo.memory import binding, secure_json
from nomyo.memory.buffer import SecureBuffer
from nomyo.memory.failclosed import require_native, require_protection
from nomyo.memory.hardening import harden_process
from nomyo.memory.report import MemoryProtectionLevel, get_memory_protection_info
from nomyo.memory.settings import disable_secure_memory, enable_secure_memory

if binding.pyobjects is not None:
    # Exported as the C functions themselves: a Python wrapper would add a reference and
    # every wipe would be refused as "still referenced elsewhere". For the same reason,
    # callers call them inline on their own local, never through a helper of their own:
    # wipe_bytes(b) succeeds only when that local is the object's one reference.
    wipe_bytes = binding.pyobjects.wipe_bytes
    wipe_str = binding.pyobjects.wipe_str
else:

    def wipe_bytes(obj: bytes) -> bool:
        """Fallback backend: immutable objects cannot be wiped; returns False."""
        return False

    def wipe_str(obj: str) -> bool:
        """Fallback backend: immutable objects cannot be wiped; returns False."""
        return False


def adopt_bytes(data: bytes, alloc: Callable[[int], SecureBuffer] = SecureBuffer
                ) -> SecureBuffer:
    """Move an immutable secret that a third-party API forced on us (e.g. RSA decryption's
    `bytes`) into secure memory from `alloc(size)`, and zero the original in place at once.
    Pass the object itself, holding no other reference: wiping is refused otherwise."""
    try:
        buf = alloc(len(data))
        with memoryview(buf) as dst:
            dst[:] = data
        return buf
    finally:
        wipe_bytes(data)  # our parameter is now its one reference (the call handed it over)


@contextmanager
def secure_bytearray(data: Any, lock: bool = True) -> Iterator[SecureBuffer]:
    """Move data into secure memory for the block: the caller's bytearray is wiped at once,
    the yielded buffer (`.data` is a writable view) is wiped and released on exit.
    `lock=False` skips locking for this buffer (published signature)."""
    buf = SecureBuffer.copy_of(data, lock=None if lock else False)
    if isinstance(data, bytearray):
        data[:] = bytes(len(data))
    try:
        yield buf
    finally:
        if not buf.closed:
            buf.close()


@contextmanager
def secure_bytes(data: Any, lock: bool = True) -> Iterator[SecureBuffer]:
    """Deprecated alias of secure_bytearray, kept for code written for the published client."""
    warnings.warn("secure_bytes is deprecated; use secure_bytearray", DeprecationWarning,
                  stacklevel=3)
    with secure_bytearray(data, lock) as buf:
        yield buf


__all__ = [
    "MemoryProtectionLevel",
    "SecureBuffer",
    "adopt_bytes",
    "disable_secure_memory",
    "enable_secure_memory",
    "get_memory_protection_info",
    "harden_process",
    "require_native",
    "require_protection",
    "secure_bytearray",
    "secure_bytes",
    "secure_json",
    "wipe_bytes",
    "wipe_str",
]
