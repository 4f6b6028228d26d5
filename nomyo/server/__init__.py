"""`nomyo.server`: a self-hostable protocol 1.0 secure-completion endpoint.

`start_background()` runs one on loopback in a thread, on the standard library (tests,
`nomyo chat`); `nomyo serve` runs the same app on granian, the production server of the
`server` extra (`nomyo.server.production`); `nomyo.server.asgi` and `nomyo.server.wsgi` expose
it to other ASGI and WSGI servers.
"""

from __future__ import annotations

from typing import Any

from nomyo.server.app import SecureCompletionApp
from nomyo.server.factory import create_app
from nomyo.server.local import DEFAULT_TIMEOUT, LoopbackServer, ServerHandle, tls_context

__all__ = ["SecureCompletionApp", "ServerHandle", "create_app", "start_background"]


def start_background(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    backend: str = "echo",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **options: Any,
) -> ServerHandle:
    """Start a loopback server in a daemon thread; port 0 picks a free port (`handle.url`).

    Other keywords go to `create_app` (key, key_file, api_keys, tier_policy, rate_limit, ...).
    Use the handle as a context manager or call `handle.stop()`. Loopback addresses only.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key file")
    app = create_app(backend=backend, **options)
    context = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    return ServerHandle(LoopbackServer((host, port), app, timeout=timeout, ssl_context=context))
