"""Native secure buffers: each its own guarded mapping from the C allocator (guard pages,
locked, excluded from dumps, memfd_secret where allowed, wiped on every release), owned and
exported to Python by the CPython `Region` type.

Region releases the memory itself, under the GIL, in two places only: close() or the last
view of a closed secret going, and deallocation (which cannot come before the last view
has gone). Nothing here frees memory from a finaliser, so no garbage-collector order and
no thread can unmap pages a view still sees."""
from __future__ import annotations

from nomyo.memory import failclosed, settings
from nomyo.memory.binding import fill_random, pyobjects, region_flags
from nomyo.memory.secret_policy import _checked_capacity, _checked_size, _SecretPolicy


class _NativeSecret(_SecretPolicy, pyobjects.Region):
    """What native secrets share: close() wipes at once and releases the memory now, or
    once the last live view is gone."""

    __slots__ = ()

    def close(self) -> None:
        """Wipe now; release now, or when the last live view is released."""
        self._release_view()
        self._close()  # ValueError when already closed

    def fill_random(self) -> None:
        """Overwrite the whole secret with bytes from the kernel CSPRNG, in place (through a
        view, so that a concurrent close() cannot unmap the pages under getrandom)."""
        with memoryview(self) as view:  # refused once closed or in a forked child
            fill_random(view)


class SecureBuffer(_NativeSecret):
    """Fixed-size secret memory: guarded, locked, excluded from dumps, wiped on release.

    Exposes the writable buffer protocol (memoryview, readinto, encrypt_into) and refuses
    silent copies. close() wipes at once; the pages are unmapped as soon as no view is
    left. Use after close raises ValueError.
    """

    __slots__ = ("__weakref__", "_view")

    def __new__(
        cls, size: int, *, lock: bool | None = None, capacity: int | None = None,
        require: bool | None = None,
    ) -> SecureBuffer:
        n = _checked_size(size)
        room = _checked_capacity(n, capacity)
        flags = region_flags(lock=settings.enabled() if lock is None else bool(lock))
        self = super().__new__(cls, n, room, flags)
        self._view = None
        if failclosed.required(require):
            try:
                failclosed.require_protection(self.locked, self.dump_excluded,
                                              lock_errno=self.lock_errno)
            except BaseException:
                self._close()
                raise
        return self

    def cell_below(self, size: int) -> SecureCell | None:
        """A `size`-byte secret in this buffer's own mapping, just below its data and
        canary, or None when there is no room. It needs no mapping of its own (no page
        fault, TLB shootdown or unmap: a tenth of a millisecond after a network wait)
        and holds an export of this buffer until closed, so that this buffer can be
        neither refit nor unmapped under it. Its writers must be exact: it has no guard
        page."""
        n = _checked_size(size)
        return SecureCell(n, self)  # ValueError when closed or in a forked child

    def refit(self, size: int) -> None:
        """Reuse this buffer for a new secret of `size` bytes (at most `capacity`): the old
        contents are wiped first, and the data moves against the trailing guard page with
        a fresh canary before it. Refused while a view of the buffer is alive."""
        n = _checked_size(size)
        self._release_view()
        self._refit(n)  # ValueError when closed or too big, BufferError with a live view


class SecureCell(_NativeSecret):
    """A secret inside a SecureBuffer's mapping (see `SecureBuffer.cell_below`), locked
    and excluded from dumps as that mapping is; wiped on close, or when dropped."""

    __slots__ = ("_view",)

    def __new__(cls, size: int, owner: SecureBuffer) -> SecureCell | None:  # type: ignore[misc]
        self = super().__new__(cls, size, owner=owner)
        if self is not None:
            self._view = None
        return self
