"""What every secure buffer, native or fallback, refuses (silent copies) and offers (context
manager, views, sizes checked alike)."""
from __future__ import annotations

import operator
from typing import Any

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


