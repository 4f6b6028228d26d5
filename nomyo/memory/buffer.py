"""SecureBuffer: fixed-size secret memory that Python code can read and write in place.

Native backend: each buffer is its own guarded mapping from the C allocator (guard pages,
locked, excluded from dumps, memfd_secret where allowed, wiped on every release). Fallback
backend (no compiled helper): an anonymous private mmap that is still wiped on release.
"""
from __future__ import annotations

import logging
import mmap
import operator
from typing import Any

from nomyo.errors import SecureMemoryUnavailable
from nomyo.memory import _native, limits, settings
from nomyo.memory._native import check_errno, ffi, lib

log = logging.getLogger("nomyo.memory")

MAX_SIZE = 1 << 34  # 16 GiB: far above any protocol use, well below address-space trouble


def _checked_size(size: Any) -> int:
    try:
        n = operator.index(size)
    except TypeError:
        raise TypeError(f"SecureBuffer size must be an int, not {type(size).__name__}") from None
    if not 0 < n <= MAX_SIZE:
        raise ValueError(f"SecureBuffer size must be between 1 and {MAX_SIZE} bytes, got {n}")
    return n


def _checked_capacity(size: int, capacity: Any) -> int:
    """Bytes a later refit may grow to: `size` when not given, never less than it."""
    room = size if capacity is None else _checked_size(capacity)
    if room < size:
        raise ValueError(f"capacity {room} is smaller than the size {size}")
    return room


class _SecretPolicy:
    """What every secure buffer refuses (silent copies) and offers (context manager, views)."""

    __slots__ = ()

    def __bytes__(self) -> bytes:
        raise TypeError(
            "bytes() of a SecureBuffer is refused: it would copy the secret out of secure "
            "memory; use memoryview(buf) to work on it in place"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a SecureBuffer cannot be pickled")

    def __copy__(self) -> Any:
        raise TypeError("a SecureBuffer cannot be copied; use SecureBuffer.copy_of explicitly")

    def __deepcopy__(self, memo: Any) -> Any:
        return self.__copy__()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"locked={self.locked}"
        return f"<SecureBuffer size={len(self)} {state}>"

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.closed:
            self.close()

    @property
    def size(self) -> int:
        return len(self)

    @property
    def data(self) -> memoryview:
        """A writable view of the secret, released by close()."""
        if self._view is None:
            self._view = memoryview(self)
        return self._view

    def zero(self) -> None:
        """Alias of wipe() for code written for the published client."""
        self.wipe()

    def _release_view(self) -> None:
        view, self._view = self._view, None
        if view is not None:
            try:
                view.release()
            except BufferError:  # caller re-exported it; unmapping waits for that export
                pass

    @classmethod
    def random(cls, size: int) -> Any:
        """A buffer filled from the kernel CSPRNG: keys are born inside secure memory."""
        buf = cls(size)
        try:
            buf.fill_random()
        except BaseException:
            buf.close()
            raise
        return buf

    @classmethod
    def copy_of(cls, data: Any, *, lock: bool | None = None) -> Any:
        """A new buffer holding a copy of any bytes-like object."""
        with memoryview(data) as src:
            flat = src.cast("B") if src.format != "B" or src.ndim != 1 else src
            buf = cls(flat.nbytes, lock=lock)
            with memoryview(buf) as dst:
                dst[:] = flat
            if flat is not src:
                flat.release()
        return buf


if _native.BACKEND == "native":

    class _NativeSecret(_SecretPolicy, _native.pyobjects.Region):
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

    class SecureBuffer(_NativeSecret):
        """Fixed-size secret memory: guarded, locked, excluded from dumps, wiped on release.

        Exposes the writable buffer protocol (memoryview, readinto, encrypt_into) and refuses
        silent copies. close() wipes at once; the pages are unmapped as soon as no view is
        left. Use after close raises ValueError.
        """

        __slots__ = ("__weakref__", "_region", "_view")

        def __new__(
            cls, size: int, *, lock: bool | None = None, capacity: int | None = None
        ) -> SecureBuffer:
            n = _checked_size(size)
            room = _checked_capacity(n, capacity)
            want_lock = settings.enabled() if lock is None else bool(lock)
            flags = _native.ALLOCATOR_FLAGS | (0 if want_lock else lib.NM_FLAG_NO_LOCK)
            region = ffi.new("nm_region *")
            check_errno(lib.nm_region_alloc(region, n, room, flags), "secure allocation failed")
            try:
                if settings.required() and not (region.locked and region.dump_excluded):
                    raise SecureMemoryUnavailable(
                        limits.missing_protection_message(
                            bool(region.locked), bool(region.dump_excluded), region.lock_errno
                        )
                    )
                self = super().__new__(cls, int(ffi.cast("uintptr_t", region.data)), n)
            except BaseException:
                lib.nm_region_free(region)
                raise
            self._region = region
            self._view = None
            return self

        @property
        def locked(self) -> bool:
            return bool(self._region.locked) and not self.closed

        @property
        def allocator(self) -> str:
            return "memfd_secret" if self._region.allocator == lib.NM_ALLOC_MEMFD_SECRET else "mmap"

        @property
        def address(self) -> int:
            return int(ffi.cast("uintptr_t", self._region.data))

        @property
        def capacity(self) -> int:
            """The largest size `refit` accepts: the mapping's pages less the canary."""
            return int(self._region.inner_len) - lib.NM_CANARY_BYTES

        def fill_random(self) -> None:
            """Overwrite the whole buffer with bytes from the kernel CSPRNG, in place."""
            if self._foreign or self.closed:
                raise ValueError("secure buffer is closed")
            check_errno(lib.nm_fill_random(self._region.data, len(self)), "getrandom failed")

        def cell_below(self, size: int) -> SecureCell | None:
            """A `size`-byte secret in this buffer's own mapping, just below its data and
            canary, or None when there is no room. It needs no mapping of its own (no page
            fault, TLB shootdown or unmap: a tenth of a millisecond after a network wait)
            and holds a view of this buffer until closed, so that this buffer can be neither
            refit nor unmapped under it. Its writers must be exact: it has no guard page."""
            n = _checked_size(size)
            if self.closed or self._foreign:
                raise ValueError("secure buffer is closed")
            start = (self.address - lib.NM_CANARY_BYTES - n) & ~15
            if start < int(ffi.cast("uintptr_t", self._region.inner)):
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
            check_errno(lib.nm_region_refit(self._region, n), "secure refit failed")
            self._refit(int(ffi.cast("uintptr_t", self._region.data)), n)

        @property
        def _mapped(self) -> bool:
            """True until the pages are unmapped (by close, or by finalisation)."""
            region = self._region
            return region is not None and region.base != ffi.NULL

        def _release_closed(self) -> None:
            self._free()  # nm_region_free wipes the whole mapping before unmapping it

        def _free(self) -> None:
            region = self._region
            if not self._mapped:
                return
            if self._foreign:  # forked child: the pages are absent or wiped, never touch them
                lib.nm_region_unmap(region)
            else:
                check_errno(lib.nm_region_free(region), "secure free failed")

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

        def fill_random(self) -> None:
            """Overwrite the whole cell with bytes from the kernel CSPRNG, in place."""
            with memoryview(self) as view:  # refused once closed or in a forked child
                check_errno(lib.nm_fill_random(ffi.from_buffer(view), len(view)),
                            "getrandom failed")

        def _release_closed(self) -> None:
            if self._owner._mapped:  # never through an owner a garbage cycle already unmapped
                self._wipe_closed()
            self._free()

        def _free(self) -> None:
            self._hold.release()  # the owner may move or be unmapped again

else:

    class SecureBuffer(_SecretPolicy, mmap.mmap):  # type: ignore[no-redef]
        """Fallback secure buffer (no native helper): private anonymous memory, wiped on close,
        but not locked, not excluded from dumps and copied into forked children."""

        __slots__ = ("_view",)

        def __new__(
            cls, size: int, *, lock: bool | None = None, capacity: int | None = None
        ) -> SecureBuffer:
            n = _checked_size(size)
            _checked_capacity(n, capacity)  # validated alike; the data cannot move here anyway
            if settings.required():
                raise SecureMemoryUnavailable(
                    "secure memory is required (NOMYO_REQUIRE_SECURE_MEMORY=1) but the native "
                    f"helper is not available ({_native.FALLBACK_REASON}); reinstall nomyo with "
                    "a C compiler so that it builds"
                )
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
