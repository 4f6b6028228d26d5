"""Secure memory: guarded buffers, wiping of forced copies, the protection report, hardening.

This layer depends on nothing above it; the envelope, keys, client and server build on it.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from nomyo.errors import WipeRefusedError
from nomyo.memory import binding, secure_json
from nomyo.memory.buffer import SecureBuffer
from nomyo.memory.failclosed import require_native, require_protection
from nomyo.memory.hardening import harden_process
from nomyo.memory.report import MemoryProtectionLevel, get_memory_protection_info
from nomyo.memory.settings import disable_secure_memory, enable_secure_memory

# Wiping an immutable object that a third-party API forced on us: the caller hands it over
# in a one-element list after deleting its own names for it,
#     box = [data]; del data; wipe_bytes_owned(box)
# The list is emptied, and the object is zeroed only if that left exactly one reference: the
# one the wipe holds. Anything else still holding it (a global, a cache, a container, a
# frame's f_locals) or an interned str makes it raise WipeRefusedError and write nothing.
# True: zeroed. False: a value of at most one byte or Latin-1 character that is not ours
# alone, left as it is: the interpreter keeps shared, often immortal, objects for each such
# value, so another copy reveals nothing and those objects must never be written (this is
# what lets a one-character password through). The box is emptied whatever happens.
if binding.pyobjects is not None:
    wipe_bytes_owned = binding.pyobjects.wipe_bytes_owned
    wipe_str_owned = binding.pyobjects.wipe_str_owned
else:
    # The fallback cannot write into an immutable object; it applies the same rule and
    # drops the reference. Two differences, documented rather than guessed at: it cannot
    # tell an interned str (no way to ask without interning it), and a tracer reading
    # these functions' own f_locals adds a reference, so it refuses then.

    def _check_box(box: Any, kind: type, name: str) -> None:
        if type(box) is not list or len(box) != 1:
            raise TypeError(f"{name} needs a list holding exactly one {kind.__name__} object")
        if type(box[0]) is not kind:
            raise TypeError(f"{name} needs a list holding one {kind.__name__} object, "
                            f"not '{type(box[0]).__name__}'")

    def _one_char_value(obj: Any) -> bool:
        return len(obj) == 0 or (len(obj) == 1 and (type(obj) is bytes or ord(obj) <= 0xFF))

    # Each function counts on its own local: passed on to a helper, the object would gain
    # the caller's stack reference on 3.10 (and not on 3.11+), a guess again.
    def wipe_bytes_owned(box: list[bytes]) -> bool:
        """Fallback backend: take the bytes out of the box and drop it (never zeroed)."""
        _check_box(box, bytes, "wipe_bytes_owned")
        obj = box.pop()
        # Held by `obj` and by getrefcount's own argument: 2 when nobody else holds it.
        if sys.getrefcount(obj) == 2 or _one_char_value(obj):
            return False
        del obj  # the traceback keeps no reference, as the native one keeps none
        raise WipeRefusedError("refusing to wipe: the bytes object is still referenced "
                               "elsewhere; it was not zeroed")

    def wipe_str_owned(box: list[str]) -> bool:
        """Fallback backend: take the str out of the box and drop it (never zeroed)."""
        _check_box(box, str, "wipe_str_owned")
        obj = box.pop()
        if sys.getrefcount(obj) == 2 or _one_char_value(obj):
            return False
        del obj
        raise WipeRefusedError("refusing to wipe: the str is still referenced elsewhere; "
                               "it was not zeroed")


def adopt_bytes(box: list[bytes], alloc: Callable[[int], SecureBuffer] = SecureBuffer
                ) -> SecureBuffer:
    """Move an immutable secret that a third-party API forced on us (e.g. RSA decryption's
    `bytes`) into secure memory from `alloc(size)`, and zero the original in place at once.
    Hand it over as `wipe_bytes_owned` takes it: a one-element list holding its only
    reference (`adopt_bytes([key.decrypt(...)])`); the list is emptied. WipeRefusedError
    if someone else still holds it, the new buffer then wiped (it is alloc's to release)."""
    try:
        buf = alloc(len(box[0]))
    except BaseException:
        wipe_bytes_owned(box)
        raise
    try:
        with memoryview(buf) as dst:
            binding.copy_scrub(dst, box[0])  # in C, then registers and stack cleared
        wipe_bytes_owned(box)
    except BaseException:
        buf.wipe()
        raise
    return buf


@contextmanager
def secure_bytearray(data: Any, lock: bool = True) -> Iterator[SecureBuffer]:
    """Move data into secure memory for the block: the caller's bytearray is wiped at once,
    the copy made in C, which then clears the vector registers and the stack below it;
    the yielded buffer (`.data` is a writable view) is wiped and released on exit.
    `lock=False` skips locking for this buffer (published signature)."""
    with memoryview(data) as src:
        buf = SecureBuffer(src.nbytes, lock=None if lock else False)
        try:
            with memoryview(buf) as dst:
                binding.copy_scrub(dst, src)  # in C, then registers and stack cleared
        except BaseException:
            buf.close()
            raise
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
    "wipe_bytes_owned",
    "wipe_str_owned",
]
