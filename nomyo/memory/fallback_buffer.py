"""Fallback secure buffers, used when the native helper is not built: private anonymous
memory, wiped on close, but not locked, not excluded from dumps, and copied into forked
children. Every report says so."""
from __future__ import annotations

import logging
import mmap

from nomyo.memory import binding, failclosed
from nomyo.memory.secret_policy import _checked_capacity, _checked_size, _SecretPolicy

log = logging.getLogger("nomyo.memory")


class SecureBuffer(_SecretPolicy, mmap.mmap):  # type: ignore[no-redef]
    """Fallback secure buffer (no native helper): private anonymous memory, wiped on close,
    but not locked, not excluded from dumps and copied into forked children."""

    __slots__ = ("_view",)

    def __new__(
        cls, size: int, *, lock: bool | None = None, capacity: int | None = None,
        require: bool | None = None,
    ) -> SecureBuffer:
        n = _checked_size(size)
        _checked_capacity(n, capacity)  # validated alike; the data cannot move here anyway
        if failclosed.required(require):
            failclosed.require_native(binding.FALLBACK_REASON)
        self = super().__new__(cls, -1, n, flags=mmap.MAP_PRIVATE)
        self._view = None
        return self

    locked = False
    allocator = "mmap"

    def wipe(self) -> None:
        """Zero the whole buffer."""
        self[:] = bytes(len(self))

    @property
    def capacity(self) -> int:
        """Fallback buffers cannot move their data: `refit` keeps the size."""
        return len(self)

    def fill_random(self) -> None:
        """Overwrite the whole buffer with random bytes (fallback: they pass the heap)."""
        import secrets

        self[:] = secrets.token_bytes(len(self))

    def cell_below(self, size: int) -> None:
        """Fallback buffers hand out no cells: a key gets a buffer of its own."""
        _checked_size(size)

    def refit(self, size: int) -> None:
        """Reuse this buffer for a new secret of the same size: wiped first."""
        n = _checked_size(size)
        if self.closed:
            raise ValueError("secure buffer is closed")
        if n != len(self):
            raise ValueError(f"refit to {n} bytes exceeds the capacity of {len(self)}")
        self.wipe()

    def close(self) -> None:
        """Wipe now and unmap (later, if a view is still alive)."""
        if self.closed:
            raise ValueError("secure buffer is already closed")
        self._release_view()
        self.wipe()
        try:
            mmap.mmap.close(self)
        except BufferError:
            log.debug("fallback buffer still has views; unmapped when they go")
