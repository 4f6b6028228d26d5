"""The loopback endpoint: `start_background()` for `nomyo chat` and tests, standard library only.

`nomyo chat` without `--base-url` must work after a plain `pip install nomyo`, so this path
needs nothing beyond the runtime dependencies: `wsgiref` with a thread per connection,
serving `SecureCompletionApp` through its WSGI entry point. It is for one process talking to
itself and listens on loopback addresses only; anything reachable by others runs
`nomyo serve` on granian (docs/server.md), whose parser, limits and workers are built for it.
"""

from __future__ import annotations

import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from nomyo.server.app import SecureCompletionApp
from nomyo.server.policy import is_loopback

DEFAULT_TIMEOUT = 30.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None  # the app writes the access log

    def setup(self) -> None:
        self.request.settimeout(self.server.io_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # in this connection's thread, not the accept loop
        super().setup()


class LoopbackServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], app: SecureCompletionApp, *,
        timeout: float = DEFAULT_TIMEOUT, ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not is_loopback(address[0]):
            raise ValueError(
                f"the embedded endpoint listens on loopback only, not {address[0]!r}; "
                "use `nomyo serve` (pip install 'nomyo[server]') for anything else"
            )
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.io_timeout = timeout
        self.ssl_context = ssl_context
        super().__init__(address, _QuietHandler)
        self.set_app(app)
        self.app = app
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # resets, handshake failures, timeouts: routine on a local endpoint

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class ServerHandle:
    """A loopback server in a background thread: `.url`, `.public_key_pem`, `.fingerprint`,
    `.app`, `.stop()`; also a context manager."""

    def __init__(self, server: LoopbackServer) -> None:
        self.server = server
        self.app = server.app
        self.url = server.url
        self.public_key_pem = server.app.keypair.public_pem
        self.fingerprint = server.app.keypair.fingerprint
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"nomyo-local-{server.server_address[1]}", daemon=True,
        )
        self._thread.start()
        self._stopped = False

    def stop(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=grace)
        self.app.backend.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle({self.url})"


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """Server TLS context (TLS 1.2+) from PEM certificate chain and key files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context

