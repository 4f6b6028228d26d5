"""Several server processes on one listening socket (`nomyo serve --workers N`).

RSA private decryption holds the GIL in `cryptography`, so threads alone cannot use more
than one core for the protocol's dominant cost; forked workers can. The socket and the
server key are made once, before forking, so every worker serves the same key. Rate limits
are counted per worker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from nomyo.server.http import EmbeddedServer, serve_until_signalled

logger = logging.getLogger("nomyo.server")


def serve_workers(
    server: EmbeddedServer,
    workers: int,
    *,
    on_ready: Callable[[str], None] | None = None,
    grace: float = 10.0,
) -> int:
    """Fork `workers` processes serving `server`; stop them all on SIGTERM/SIGINT.

    Returns 0 after a clean stop, 1 if a worker died on its own. Call before any thread starts.
    """
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # worker: serve until signalled, never return into the parent's code
            status = 1
            try:
                serve_until_signalled(server, grace=grace)
                status = 0
            finally:
                logging.shutdown()
                os._exit(status)
        children.append(pid)
    server.server_close()  # the parent only supervises
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        if on_ready is not None:
            on_ready(server.url)
        status = _supervise(children, stop)
        for pid in children:
            _signal(pid, signal.SIGTERM)
        if not _reap(children, deadline=time.monotonic() + grace + 5):
            status = 1
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(children: list[int], stop: threading.Event) -> int:
    """Wait for a stop signal (0), or for a worker to die by itself (1)."""
    while not stop.wait(0.5):
        for pid in list(children):
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                children.remove(pid)
                logger.error(
                    "worker %d exited with status %d; stopping",
                    pid,
                    os.waitstatus_to_exitcode(code),
                )
                return 1
    return 0


def _reap(children: list[int], deadline: float) -> bool:
    """Wait for the workers; SIGKILL those still alive at `deadline`. True if all exited 0."""
    clean = True
    pending = list(children)
    while pending:
        for pid in list(pending):
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                pending.remove(pid)
                clean = clean and os.waitstatus_to_exitcode(code) == 0
        if pending and time.monotonic() > deadline:
            logger.error("workers %s did not stop in time; killing them", pending)
            for pid in pending:
                _signal(pid, signal.SIGKILL)
            deadline = float("inf")
            clean = False
        if pending:
            time.sleep(0.05)
    return clean


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
