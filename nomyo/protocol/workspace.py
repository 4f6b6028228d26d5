"""The secure buffers of one exchange: where a request's key and plaintext are born, and where
its answer lands, reused within the exchange and wiped between uses.

Creating and tearing down guarded mappings is most of what secure memory costs, so one
exchange reuses its buffers (a request's plaintext slot holds its answer next, wiped in
between); `Fresh` gives every secret a new buffer instead. `require=True` makes every buffer
fail closed unless it is really locked and excluded from dumps.
"""
from __future__ import annotations

import mmap
import threading
from typing import Any

from nomyo.memory import SecureBuffer, forks
from nomyo.memory.binding import copy_scrub

ANSWER_HEADROOM = 4096  # see Workspace
# A workspace whose slots hold more than this (a large request or answer) is released, not
# kept idle (see WorkspacePool): a small exchange's slot is its size plus the headroom.
POOLED_CAPACITY_MAX = 8 * 1024 + ANSWER_HEADROOM


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

    def capacity(self) -> int:
        """Bytes of secret room this workspace holds (its open slots)."""
        return sum(buf.capacity for buf in self._slots.values() if not buf.closed)

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


class WorkspacePool:
    """Idle workspaces (their slots wiped when an exchange ends) for the next exchange:
    taking one saves mapping, locking, faulting and unmapping fresh guarded pages on every
    request, most of what secure memory costs a small one. At most `limit` are kept, none
    larger than POOLED_CAPACITY_MAX, so the locked memory held between requests stays small.
    A forked child starts with an empty pool (nomyo.memory.forks)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._idle: list[Workspace] = []
        self._lock = threading.Lock()
        self._closed = False
        forks.track(self)

    def take(self, require: bool | None) -> Workspace:
        """An idle workspace made with the same fail-closed setting, else a new one."""
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i].require == require:
                    return self._idle.pop(i)
        return Workspace(require=require)

    def give(self, work: Workspace, ended_cleanly: bool) -> None:
        """Keep `work` for the next exchange, or release it: after a failure (a slot may not
        have been wiped), when it grew large, or once the pool is closed."""
        if ended_cleanly and work.capacity() <= POOLED_CAPACITY_MAX:
            with self._lock:
                if not self._closed and len(self._idle) < self._limit:
                    self._idle.append(work)
                    return
        work.close()

    def close(self) -> None:
        """Release every idle workspace; later ones given back are released too."""
        with self._lock:
            self._closed = True
        self._release_idle()

    def forget_parent(self) -> None:
        """In a forked child: the idle buffers are the parent's. Closing them here unmaps
        only the child's inherited pages; the pool starts empty."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._release_idle()

    def _release_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for work in idle:
            work.close()
