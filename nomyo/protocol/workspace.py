"""The secure buffers of one exchange: where a request's key and plaintext are born, and where
its answer lands, reused within the exchange and wiped between uses.

Creating and tearing down guarded mappings is most of what secure memory costs, so one
exchange reuses its buffers (a request's plaintext slot holds its answer next, wiped in
between); `Fresh` gives every secret a new buffer instead. `require=True` makes every buffer
fail closed unless it is really locked and excluded from dumps.
"""
from __future__ import annotations

import mmap
from typing import Any

from nomyo.memory import SecureBuffer
from nomyo.memory.binding import copy_scrub

ANSWER_HEADROOM = 4096  # see Workspace


class Workspace:
    """Secure buffers one exchange reuses: a plaintext slot, and the AES key in a cell of it.

    The plaintext slot is a guarded mapping, handed out again with `refit` (old contents
    wiped) while the new plaintext fits, else replaced. The key lives in a cell just below
    the plaintext's data, in the same page, so an exchange maps and faults one page instead
    of two; only when the slot has no room (or is not there) does the key get a slot of its
    own. What the workspace hands out belongs to it: `done` wipes it (and frees the cell),
    `close` releases everything. `headroom` bytes are reserved beyond a new plaintext so
    that an answer not much larger than its request (an echo, a short reply to a short
    prompt) fits in the request's slot; untouched memfd_secret pages cost nothing until used.
    """

    def __init__(self, headroom: int = ANSWER_HEADROOM, *, require: bool | None = None) -> None:
        self.headroom = headroom
        self.require = require  # fail closed; None: the process-wide setting
        self._slots: dict[str, SecureBuffer] = {}
        self._cell: Any = None  # the key's cell in the plaintext slot, while handed out

    def key(self, size: int) -> Any:
        """A key buffer of `size` bytes: a cell of the plaintext slot when it has room."""
        owner = self._slots.get("plaintext")
        if self._cell is None and owner is not None and not owner.closed:
            self._cell = owner.cell_below(size)
            if self._cell is not None:
                return self._cell
        return self._take("key", size, 0)

    def plaintext(self, size: int) -> SecureBuffer:
        """The plaintext slot, fitted to `size` bytes."""
        return self._take("plaintext", size, self.headroom)

    def _take(self, slot: str, size: int, headroom: int) -> SecureBuffer:
        buf = self._slots.get(slot)
        if buf is not None and not buf.closed:
            if size <= buf.capacity:
                buf.refit(size)
                return buf
            buf.close()
        buf = self._slots[slot] = SecureBuffer(size, capacity=size + headroom,
                                               require=self.require)
        return buf

    def done(self, buf: Any) -> None:
        """A secret from this workspace is no longer needed: wipe it, keep the memory (a
        cell is closed, which frees its slot for the next refit)."""
        if buf is self._cell:
            self._cell = None
            buf.close()
        elif not buf.closed:
            buf.wipe()

    def hand_over(self, buf: SecureBuffer) -> SecureBuffer:
        """A secret of this workspace that the caller keeps for good (a secure answer): the
        slot itself, forgotten here, unless the slot's room beyond the secret is more than
        the headroom and a page (a large request's slot, a small answer): then an exact copy
        made in C, the slot wiped and kept. Its next plaintext gets a new slot."""
        if buf.capacity - len(buf) > self.headroom + mmap.PAGESIZE:
            copy = SecureBuffer(len(buf), require=self.require)
            try:
                with memoryview(copy) as dst, memoryview(buf) as src:
                    copy_scrub(dst, src)
            except BaseException:
                copy.close()
                raise
            finally:
                self.done(buf)
            return copy
        for slot, held in list(self._slots.items()):
            if held is buf:
                del self._slots[slot]
        return buf

    def close(self) -> None:
        """Wipe and release every slot."""
        if self._cell is not None:
            self.done(self._cell)
        slots, self._slots = self._slots, {}
        for buf in slots.values():
            if not buf.closed:
                buf.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fresh(Workspace):
    """No reuse: every secret gets a new buffer, closed as soon as it is done."""

    def _take(self, slot: str, size: int, headroom: int) -> SecureBuffer:
        return SecureBuffer(size, require=self.require)

    def done(self, buf: SecureBuffer) -> None:
        if not buf.closed:
            buf.close()


FRESH = Fresh()  # stateless: the default wherever no workspace is given
