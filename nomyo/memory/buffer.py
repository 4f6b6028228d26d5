"""SecureBuffer: fixed-size secret memory that Python code can read and write in place; the
native backend's (nomyo.memory.native_buffer) when the helper is built, else the fallback's
(nomyo.memory.fallback_buffer)."""
from __future__ import annotations

from nomyo.memory.binding import BACKEND

if BACKEND == "native":
    from nomyo.memory.native_buffer import SecureBuffer
else:
    from nomyo.memory.fallback_buffer import SecureBuffer

__all__ = ["SecureBuffer"]
