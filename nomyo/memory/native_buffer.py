"""Native secure buffers: each its own guarded mapping from the C allocator (guard pages,
locked, excluded from dumps, memfd_secret where allowed, wiped on every release), exported
to Python through the CPython `Region` type."""
from __future__ import annotations

import logging

from nomyo.memory import failclosed, settings
from nomyo.memory.binding import CANARY_BYTES, Allocation, fill_random, pyobjects
from nomyo.memory.secret_policy import _checked_capacity, _checked_size, _SecretPolicy

log = logging.getLogger("nomyo.memory")


class _NativeSecret(_SecretPolicy, pyobjects.Region):
    """What native secrets share: close() wipes at once and releases the memory (`_free`)
    now, or once the last live view is gone."""

    __slots__ = ()

    def close(self) -> None:
        """Wipe now; release now, or when the last live view is released."""
        self._release_view()
        exports = self._detach()
        if exports < 0:
            raise ValueError("secure buffer is already closed")
        if exports == 0:
            self._free()  # each subclass says what releasing means

    def _last_view_released(self) -> None:
        """Region calls this when the last view of this closed secret goes: close() ran
        while the view was alive, so what was written through it since (another thread
        decoding into it without the GIL, say) is wiped now and the memory released,
        instead of at finalisation."""
        try:
            self._release_closed()
        except Exception:  # e.g. in a garbage cycle whose slots are already cleared
            log.debug("secure release after the last view failed", exc_info=True)

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

    __slots__ = ("__weakref__", "_region", "_view")

    def __new__(
        cls, size: int, *, lock: bool | None = None, capacity: int | None = None,
        require: bool | None = None,
    ) -> SecureBuffer:
        n = _checked_size(size)
        room = _checked_capacity(n, capacity)
        region = Allocation(n, room, lock=settings.enabled() if lock is None else bool(lock))
        try:
            if failclosed.required(require):
                failclosed.require_protection(region.locked, region.dump_excluded,
                                              lock_errno=region.lock_errno)
            self = super().__new__(cls, region.data, n)
        except BaseException:
            region.free()
            raise
        self._region = region
        self._view = None
        return self

    @property
    def locked(self) -> bool:
        return self._region.locked and not self.closed

    @property
    def allocator(self) -> str:
        return self._region.allocator

    @property
    def address(self) -> int:
        return self._region.data

    @property
    def capacity(self) -> int:
        """The largest size `refit` accepts: the mapping's pages less the canary."""
        return self._region.capacity

    def cell_below(self, size: int) -> SecureCell | None:
        """A `size`-byte secret in this buffer's own mapping, just below its data and
        canary, or None when there is no room. It needs no mapping of its own (no page
        fault, TLB shootdown or unmap: a tenth of a millisecond after a network wait)
        and holds a view of this buffer until closed, so that this buffer can be neither
        refit nor unmapped under it. Its writers must be exact: it has no guard page."""
        n = _checked_size(size)
        if self.closed or self._foreign:
            raise ValueError("secure buffer is closed")
        start = (self.address - CANARY_BYTES - n) & ~15
        if start < self._region.inner:
            return None
        return SecureCell(start, n, self)

    def refit(self, size: int) -> None:
        """Reuse this buffer for a new secret of `size` bytes (at most `capacity`): the old
        contents are wiped first, and the data moves against the trailing guard page with
        a fresh canary before it. Refused while a view of the buffer is alive."""
        n = _checked_size(size)
        if self.closed or self._foreign:
            raise ValueError("secure buffer is closed")
        if n > self.capacity:
            raise ValueError(f"refit to {n} bytes exceeds the capacity of {self.capacity}")
        self._release_view()
        if self._exports:
            raise BufferError("cannot refit a secure buffer while views of it exist")
        self._region.refit(n)
        self._refit(self._region.data, n)

    @property
    def _mapped(self) -> bool:
        """True until the pages are unmapped (by close, or by finalisation)."""
        region = self._region
        return region is not None and region.mapped

    def _release_closed(self) -> None:
        self._free()  # nm_region_free wipes the whole mapping before unmapping it

    def _free(self) -> None:
        region = self._region
        if region is None:
            return
        if self._foreign:  # forked child: the pages are absent or wiped, never touch them
            region.unmap()
        else:
            region.free()

    def __del__(self) -> None:
        try:
            self._detach()
            self._free()
        except Exception:  # interpreter shutdown: nothing sensible left to raise into
            log.debug("secure buffer release at finalisation failed", exc_info=True)

class SecureCell(_NativeSecret):
    """A secret inside a SecureBuffer's mapping (see `SecureBuffer.cell_below`), locked
    and excluded from dumps as that mapping is; wiped on close."""

    __slots__ = ("_owner", "_hold", "_view", "_address")

    def __new__(cls, address: int, size: int, owner: SecureBuffer) -> SecureCell:
        self = super().__new__(cls, address, size)
        self._address = address
        self._owner = owner
        self._hold = memoryview(owner)  # keeps the owner's mapping in place
        self._view = None
        return self

    @property
    def locked(self) -> bool:
        return self._owner.locked and not self.closed

    @property
    def address(self) -> int:
        return self._address

    def __del__(self) -> None:
        # A refit of the owner wipes only its own data: a dropped cell is wiped here. In
        # a garbage cycle the owner may have been finalised (wiped whole and unmapped)
        # first: its pages are then gone and must not be touched.
        if self._owner._mapped:
            self._detach()

    def _release_closed(self) -> None:
        if self._owner._mapped:  # never through an owner a garbage cycle already unmapped
            self._wipe_closed()
        self._free()

    def _free(self) -> None:
        self._hold.release()  # the owner may move or be unmapped again

