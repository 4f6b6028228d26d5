"""`nomyo serve` on granian (the `server` extra): parsing, limits, timeouts and workers.

Why granian, and the measurements behind it, are in docs/server.md. This module only sets
it up: the app (and with it the server key) is made once in the parent, then granian forks
its workers, which therefore all serve the same key. Granian respawns a worker that dies;
each worker exits when the parent dies (`PR_SET_PDEATHSIG`, and a watchdog for the moment
before it was set); SIGTERM or SIGINT to the parent stops all of them gracefully.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nomyo.server.asgi import AsgiApp

# The parent's app, inherited by the forked workers (see worker_app), and what each worker
# runs before it serves.
_APP: Any = None
_IN_WORKER: Callable[[], None] | None = None
_PARENT_PID = 0

HEADER_TIMEOUT_MS = 5_000  # a request head (and keep-alive idling) must arrive within 5 s
HEAD_BUFFER_BYTES = 64 * 1024  # the whole request head: 431 above this
# granian's backpressure counts open connections (idle ones too, until the header timeout
# closes them): set high, since an idle connection costs no thread; the work itself is
# bounded by the adapter's thread pool.
DEFAULT_BACKPRESSURE = 4096


class ThreadAdviceFilter(logging.Filter):
    """Drops granian's advice against more WSGI threads than 2 x cores + 1: the proxy's
    threads spend their time waiting on the upstream, not holding the GIL."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Python threads, which seems quite high" not in record.getMessage()


class ServerMissing(RuntimeError):
    """granian is not installed: `pip install 'nomyo[server]'`."""


def available() -> bool:
    try:
        import granian  # noqa: F401
    except ImportError:
        return False
    return True


def worker_app() -> Any:
    """granian's factory target, called in each worker process after fork."""
    if _APP is None:
        raise RuntimeError("nomyo.server.production: no app (workers must be forked by serve)")
    _exit_with_parent(_PARENT_PID)
    if _IN_WORKER is not None:
        _IN_WORKER()
    return _APP


def serve(
    app: AsgiApp | Callable[..., Any],
    *,
    host: str,
    port: int,
    workers: int = 1,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    header_timeout_ms: int = HEADER_TIMEOUT_MS,
    backpressure: int = DEFAULT_BACKPRESSURE,
    on_ready: Any = None,
    wsgi_threads: int | None = None,
    in_worker: Callable[[], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. `port` must be a concrete port (bind it first to check).

    `app` is an ASGI application, or with `wsgi_threads` a WSGI one run in that many threads
    per worker; `in_worker` runs in each worker process before it serves."""
    global _APP, _IN_WORKER, _PARENT_PID
    try:
        from granian.constants import HTTPModes, Interfaces, SSLProtocols
        from granian.http import HTTP1Settings
        from granian.log import LogLevels
        from granian.server import Server
    except ImportError:
        raise ServerMissing(
            "nomyo serve runs on granian: pip install 'nomyo[server]'"
        ) from None
    _APP, _IN_WORKER, _PARENT_PID = app, in_worker, os.getpid()
    # The app (and the key) must reach the workers by fork, never by pickling.
    multiprocessing.set_start_method("fork", force=True)
    tls: dict[str, Any] = {}
    if tls_cert:
        tls = {"ssl_cert": Path(tls_cert), "ssl_key": Path(tls_key or ""),
               "ssl_protocol_min": SSLProtocols.tls12}
    server = Server(
        "nomyo.server.production:worker_app",
        address=host,
        port=port,
        interface=Interfaces.WSGI if wsgi_threads else Interfaces.ASGI,
        blocking_threads=wsgi_threads,
        factory=True,
        workers=workers,
        http=HTTPModes.http1,
        websockets=False,
        backpressure=backpressure,
        http1_settings=HTTP1Settings(
            header_read_timeout=header_timeout_ms,
            keep_alive=True,
            max_buffer_size=HEAD_BUFFER_BYTES,
        ),
        respawn_failed_workers=True,
        respawn_interval=0.5,
        workers_kill_timeout=15,
        log_enabled=True,
        log_level=LogLevels.warning,
        # granian's own lines to stderr: stdout carries only our "listening on" line
        log_dictconfig={"filters": {"thread_advice": {"()": ThreadAdviceFilter}}, "handlers": {
            "console": {"formatter": "generic", "class": "logging.StreamHandler",
                        "stream": "ext://sys.stderr", "filters": ["thread_advice"]},
            "access": {"formatter": "access", "class": "logging.StreamHandler",
                       "stream": "ext://sys.stderr"},
        }},
        **tls,
    )
    if on_ready is not None:
        threading.Thread(
            target=_announce_when_listening, args=(host, port, on_ready), daemon=True
        ).start()
    server.serve()


def _announce_when_listening(host: str, port: int, on_ready: Any, limit: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + limit
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((target, port), timeout=0.5):
                on_ready()
                return
        except OSError:
            time.sleep(0.05)


# How long an orphaned worker may drain before it exits regardless (the graceful path can
# stall under load; seen once at over 10 s in a full suite run).
ORPHAN_GRACE_SECONDS = 3.0


def _exit_with_parent(parent: int) -> None:
    """Make this worker go when the parent does (no orphans serving on)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # graceful first
        time.sleep(ORPHAN_GRACE_SECONDS)  # an orphan nobody supervises does not linger
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="nomyo-parent-watch").start()
