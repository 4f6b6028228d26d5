"""The client key pair's life: born early in the background, leased per request, rotated
before it ages out, wiped on close.

A pair is either ephemeral (never leaves the process) or kept in `key_dir` (loaded when the
directory holds one, else generated and saved with the private key at mode 0600). Rotation
is prepared in a background thread once a pair reaches 3/4 of `rotation_interval`, and the
new pair takes over at the first request after the interval when it is ready: no request
ever waits for an RSA key, except the very first one when its pair is still being born.
A request leases the pair it encrypts under, so a rotation never pulls the key out from
under a response in flight; a retired pair is closed when its last lease ends.
"""
from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from nomyo.errors import ConfigurationError, DisposedError
from nomyo.protocol.constants import DEFAULT_KEY_BITS, GENERATE_KEY_BITS
from nomyo.protocol.keys import PRIVATE_KEY_FILE, KeyPair, Password

logger = logging.getLogger(__name__)

PREPARE_AT = 0.75  # fraction of the rotation interval at which the next pair is prepared


class _Slot:
    """A pair in use, with its birth time and the number of requests holding it."""

    __slots__ = ("born", "leases", "pair", "retired")

    def __init__(self, pair: KeyPair, born: float) -> None:
        self.pair = pair
        self.born = born
        self.leases = 0
        self.retired = False


class KeyRing:
    """Owns the client key pairs of one client (thread-safe)."""

    def __init__(
        self,
        *,
        key_size: int = DEFAULT_KEY_BITS,
        key_dir: str | os.PathLike | None = None,
        key_password: Password = None,
        rotation_interval: float | None = 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if key_size not in GENERATE_KEY_BITS:
            raise ValueError(f"key_size must be one of {GENERATE_KEY_BITS}, not {key_size!r}")
        if rotation_interval is not None and rotation_interval < 0:
            raise ValueError("key_rotation_interval must be >= 0 seconds (0 or None disables)")
        self.key_size = key_size
        self.key_dir = Path(key_dir) if key_dir is not None else None
        self._password = key_password
        self.rotation_interval = rotation_interval or None
        if self.key_dir is not None:
            check_key_dir(self.key_dir, key_password is not None,
                          rotates=self.rotation_interval is not None)
        self._clock = clock
        self._lock = threading.Lock()
        self._current: _Slot | None = None
        self._first: Future | None = None
        self._next: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def pending_first(self) -> Future | None:
        """The first pair's birth while it is under way (None before start and once in use)."""
        return self._first

    @property
    def pending_next(self) -> Future | None:
        """The next pair's birth while a rotation is being prepared, else None."""
        return self._next

    @property
    def current(self) -> KeyPair | None:
        """The pair new requests use, or None while the first one is still being born."""
        slot = self._current
        return slot.pair if slot is not None else None

    def start(self) -> None:
        """Begin making the first pair in the background (idempotent)."""
        with self._lock:
            self._check_open()
            if self._current is None and self._first is None:
                self._first = self._submit(self._initial_pair)

    def install(self, pair: KeyPair) -> None:
        """Use `pair` from now on (generate_keys / load_keys); the previous pair is retired."""
        with self._lock:
            self._check_open()
            pending, self._first = self._first, None
            self._swap(_Slot(pair, self._clock()))
        if pending is not None:
            pending.add_done_callback(_close_result)  # a pair being born is not needed now

    def generate(self) -> KeyPair:
        """A fresh pair of this ring's size, made in the calling thread."""
        return KeyPair.generate(self.key_size)

    @contextmanager
    def lease(self) -> Iterator[KeyPair]:
        """The current pair, held for the duration of one request."""
        slot = self._acquire()
        try:
            yield slot.pair
        finally:
            with self._lock:
                slot.leases -= 1
                if slot.retired and slot.leases <= 0:
                    slot.pair.close()

    def close(self) -> None:
        """Close every pair (the private keys are dropped) and stop background work."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slot, self._current = self._current, None
            pending = [f for f in (self._first, self._next) if f is not None]
            self._first = self._next = None
            executor, self._executor = self._executor, None
        if slot is not None:
            slot.pair.close()
        for future in pending:
            future.add_done_callback(_close_result)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def forget_parent(self) -> None:
        """In a forked child: the worker thread is gone, so a pair it was making would
        never arrive, and a Future's own lock may have been held by it at the fork (asking
        it anything could hang here): the births are dropped unasked, and the child makes
        its own pair when it needs one. The current pair stays; its leases were the parent's
        requests, whose threads are gone too, so they are cleared (a lease the forking thread
        itself held ends at or below zero, which `lease` allows for)."""
        self._lock = threading.Lock()
        self._executor = None
        self._first = self._next = None
        if self._current is not None:
            self._current.leases = 0

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DisposedError("This client has been closed")

    def _submit(self, fn: Callable[[], tuple[KeyPair, float]]) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nomyo-keys")
        return self._executor.submit(fn)

    def _acquire(self) -> _Slot:
        """Take a lease on the current pair, waiting only for the very first one."""
        with self._lock:
            self._check_open()
            if self._current is None and self._first is None:
                self._first = self._submit(self._initial_pair)
            first = self._first if self._current is None else None
        if first is not None:
            try:
                pair, born = first.result()  # the first request of a client: wait for its pair
            except BaseException:
                with self._lock:  # a failed birth (e.g. key_dir briefly unwritable) is retried
                    if self._first is first:
                        self._first = None
                raise
            with self._lock:
                self._check_open()
                if self._first is first:
                    self._first = None
                    self._swap(_Slot(pair, born))
        with self._lock:
            self._check_open()
            self._rotate_if_due()
            slot = self._current
            assert slot is not None
            slot.leases += 1
            return slot

    def _rotate_if_due(self) -> None:
        """Prepare the next pair at PREPARE_AT of the interval; switch once due and ready."""
        interval = self.rotation_interval
        slot = self._current
        if interval is None or slot is None:
            return
        age = self._clock() - slot.born
        if self._next is None and age >= interval * PREPARE_AT:
            logger.debug("preparing the next client key pair in the background")
            self._next = self._submit(self._rotated_pair)
        nxt = self._next
        if age >= interval and nxt is not None and nxt.done():
            self._next = None
            try:
                pair, born = nxt.result()
            except Exception:
                logger.exception("key rotation failed; keeping the current pair")
                return
            logger.info("client key pair rotated")
            self._swap(_Slot(pair, born))

    def _swap(self, slot: _Slot) -> None:
        """Make `slot` current; retire the old one (closed now or when its last lease ends)."""
        old, self._current = self._current, slot
        if old is not None:
            old.retired = True
            if old.leases == 0:
                old.pair.close()

    def _initial_pair(self) -> tuple[KeyPair, float]:
        """Load the pair from key_dir, or generate one (saved to key_dir when set)."""
        if self.key_dir is not None:
            private_path = self.key_dir / PRIVATE_KEY_FILE
            if private_path.exists():
                pair = KeyPair.load(private_path, self._password)
                logger.debug("client key pair loaded from %s", self.key_dir)
                return pair, private_path.stat().st_mtime
        return self._rotated_pair()

    def _rotated_pair(self) -> tuple[KeyPair, float]:
        """A freshly generated pair, saved to key_dir when set."""
        pair = self.generate()
        if self.key_dir is not None:
            pair.save(self.key_dir, self._password)
        return pair, self._clock()


def check_key_dir(key_dir: Path, has_password: bool, rotates: bool) -> None:
    """Refuse, in one line naming the directory, a key_dir the key thread could not use: not
    a directory (or under a file), not writable where a pair must be saved (none there yet,
    or rotation on), a private key that cannot be read or needs a password not given. The
    directory is created (0700) when missing, as saving would; writing is probed by creating
    and removing a file, which also sees read-only and immutable directories as root."""
    private_path = key_dir / PRIVATE_KEY_FILE
    step = "cannot be created"
    try:
        if key_dir.exists() and not key_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory")
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        step = "has an unreadable private key"
        exists = private_path.exists()
        if exists:
            with open(private_path, "rb") as f:
                first_line = f.readline(64)  # only the BEGIN line: no key material read
            if b"ENCRYPTED" in first_line and not has_password:
                raise ConfigurationError(f"key_dir {str(key_dir)!r}: its private key is "
                                         "encrypted and no key_password was given")
        if not exists or rotates:
            step = "is not writable (key pairs are saved there)"
            fd, probe = tempfile.mkstemp(prefix=".nomyo-probe-", dir=key_dir)
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigurationError(f"key_dir {str(key_dir)!r} {step}: {reason}") from None


def _close_result(future: Future) -> None:
    """Close a pair born after its ring was closed."""
    if not future.cancelled() and future.exception() is None:
        future.result()[0].close()
