"""`nomyo.server`: a self-hostable protocol 1.0 secure-completion endpoint.

`start_background()` runs one in a thread (tests, `nomyo chat`); `nomyo serve` runs one in the
foreground; `nomyo.server.wsgi` exposes the same application to production WSGI servers.
"""

from __future__ import annotations

from typing import Any

from nomyo.server.app import SecureCompletionApp
from nomyo.server.factory import create_app
from nomyo.server.http import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
    EmbeddedServer,
    ServerHandle,
    tls_context,
)

__all__ = ["SecureCompletionApp", "ServerHandle", "create_app", "start_background"]


def start_background(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    backend: str = "echo",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    **options: Any,
) -> ServerHandle:
    """Start a server in a daemon thread; port 0 picks a free port (see `handle.url`).

    Other keywords go to `create_app` (key, key_file, api_keys, tier_policy, rate_limit, ...).
    Use the handle as a context manager or call `handle.stop()`.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key file")
    app = create_app(backend=backend, **options)
    context = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    server = EmbeddedServer(
        (host, port),
        app,
        timeout=timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
        ssl_context=context,
    )
    return ServerHandle(server)
