"""Strict standard base64 for protocol packages: the native codec when built, else binascii.

    encode(data) -> bytes                      standard alphabet, '=' padded, no newlines
    decode(text) -> bytes                      text: ASCII str or bytes-like
    decode_into(text, out, offset) -> int      decodes into out[offset:], returns the end

Decoding accepts exactly what CPython 3.11's `base64.b64decode(text, validate=True)` accepts
(no whitespace, `=` only at the end) and raises ValueError otherwise, with a message naming the
problem and its position, never the text. decode_into never touches out outside
[offset, end), and on ValueError leaves no decoded byte in it (see csrc/b64codec.c). Both
backends behave identically; `NATIVE` says which one is in use. `NOMYO_MEMORY_BACKEND=fallback`
forces the Python one, as it does for secure memory.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any, Optional

from nomyo.memory import binding
from nomyo.protocol import b64_fallback as _b64_fallback

log = logging.getLogger("nomyo.protocol.b64")


def _load_native() -> Optional[ModuleType]:
    """The compiled codec, or None (logged) when it is switched off, missing or stale."""
    module, reason = binding.native_module("_b64")
    if module is None:
        log.debug("native base64 codec unavailable, using the binascii fallback: %s", reason)
    return module


_backend = _load_native()
NATIVE: bool = _backend is not None
if _backend is None:
    _backend = _b64_fallback

encode: Callable[[Any], bytes] = _backend.encode
decode: Callable[[Any], bytes] = _backend.decode
decode_into: Callable[[Any, Any, int], int] = _backend.decode_into

__all__ = ["NATIVE", "decode", "decode_into", "encode"]
