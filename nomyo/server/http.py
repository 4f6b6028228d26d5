"""The embedded HTTP/1.1 server: keep-alive, a bounded thread per connection, optional TLS.

Standard library only (`http.server`), so `nomyo serve` needs nothing beyond the runtime
dependencies. A request head (and keep-alive idling) must arrive within `timeout` in total
and a body within `body_timeout`, however slowly it trickles, and oversized bodies are
refused before reading: a slow or oversized client cannot pin a worker.
"""

from __future__ import annotations

import io
import json
import logging
import math
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nomyo.server.app import (
    HttpError,
    Response,
    SecureCompletionApp,
    error_response,
    parse_content_length,
)

logger = logging.getLogger("nomyo.server")

DEFAULT_TIMEOUT = 30.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 64


class _DeadlineReader(io.RawIOBase):
    """The connection's read side, bounded per phase: a request head (or keep-alive idling) must
    arrive within `io_timeout` in total, a body within `body_timeout`, however slowly it trickles.
    """

    def __init__(self, sock: socket.socket, io_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._io_timeout = io_timeout
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("read deadline passed")
        self._sock.settimeout(min(self._io_timeout, remaining))
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nomyo"
    sys_version = ""
    server: EmbeddedServer

    def setup(self) -> None:
        self.timeout = self.server.io_timeout  # per socket operation, incl. keep-alive idling
        super().setup()
        # Answers are written in one piece; without NODELAY a keep-alive client's delayed ACK
        # could still stall the next small write by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # in this worker thread, never in the accept loop
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection, self.server.io_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self.server.mark(self.connection, busy=False)
        self._reader.deadline = time.monotonic() + self.server.io_timeout  # idle + head, total
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server.mark(self.connection, busy=True)
        return ok

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self._unread = 0
        if "transfer-encoding" in headers:
            self.close_connection = True
            self._send(error_response(411, "chunked bodies are not supported; send Content-Length"))
            return
        try:
            content_length = parse_content_length(headers.get("content-length"))
        except ValueError:
            self.close_connection = True
            self._send(error_response(400, "invalid Content-Length"))
            return
        self._unread = content_length or 0
        response = self.server.app.handle(
            self.command,
            self.path,
            headers,
            content_length,
            self._read_body,
            self.client_address[0],
        )
        if self._unread:
            self.close_connection = True  # the body was refused unread: cannot reuse the stream
        self._send(response)

    def _read_body(self, size: int) -> bytearray:
        """Exactly `size` body bytes (ciphertext), within the body deadline."""
        body = bytearray(size)
        self._reader.deadline = time.monotonic() + self.server.body_timeout
        got = 0
        with memoryview(body) as view:
            while got < size:
                try:
                    n = self.rfile.readinto1(view[got:])
                except (TimeoutError, OSError):
                    self.close_connection = True
                    raise HttpError(408, "request body not received in time") from None
                if not n:
                    self.close_connection = True
                    raise HttpError(400, "request body shorter than Content-Length")
                got += n
        self._unread = 0
        return body

    def _send(self, response: Response) -> None:
        self.connection.settimeout(self.server.io_timeout)  # reads may have left it shorter
        if self.server.stopping:
            self.close_connection = True
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Status line, headers and body leave in one write (one TCP segment for small answers).
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(response.body)
        self.flush_headers()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors of http.server (bad request line, huge headers) as JSON too."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # we never speak HTTP/0.9: always send a status line
        body = json.dumps({"detail": message or "bad request"}).encode("utf-8")
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: " + format, *args)


class EmbeddedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on live connections and a graceful `stop()`."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        app: SecureCompletionApp,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.app = app
        self.io_timeout = timeout
        self.body_timeout = body_timeout
        self.stopping = False
        self.ssl_context = ssl_context
        self._slots = threading.BoundedSemaphore(max_connections)
        self._connections: dict[socket.socket, bool] = {}  # socket -> busy with a request
        self._workers: set[threading.Thread] = set()
        self._lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )
        # Non-blocking accept: when worker processes share this socket, all are woken for one
        # connection; the losers must get EAGAIN, not block in accept() (and miss shutdown).
        self.socket.setblocking(False)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        with self._lock:
            self._connections[request] = False
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self._lock:
            self._workers.add(thread)
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.pop(request, None)
                self._workers.discard(threading.current_thread())
            self._slots.release()

    def _refuse(self, request: Any) -> None:
        """Too many live connections: a short 503 (plain HTTP) and close, from the accept loop."""
        if self.ssl_context is None:
            body = b'{"detail": "server busy: too many connections"}'
            try:
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                    b"\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            except OSError:
                pass
        self.shutdown_request(request)

    def mark(self, connection: socket.socket, *, busy: bool) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections[connection] = busy

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Client-side failures (TLS handshake refused, reset, timeouts) are routine: no traceback.
        logger.debug(
            "connection from %s ended: %s", client_address[0], type(sys.exc_info()[1]).__name__
        )

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, close idle keep-alive connections, let requests in flight finish."""
        self.stopping = True
        self.shutdown()
        self.server_close()
        deadline = time.monotonic() + grace
        while True:
            with self._lock:
                idle = [c for c, busy in self._connections.items() if not busy]
                threads = list(self._workers)
            for conn in idle:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if not threads or time.monotonic() > deadline:
                break
            threads[0].join(timeout=0.05)
        self.app.backend.close()


class ServerHandle:
    """A server running in a background thread: `.url`, `.public_key_pem`, `.fingerprint`,
    `.stop()`."""

    def __init__(self, server: EmbeddedServer) -> None:
        self.server = server
        self.app = server.app
        port = server.server_address[1]
        self.url = server.url
        self.public_key_pem = server.app.keypair.public_pem
        self.fingerprint = server.app.keypair.fingerprint
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"nomyo-server-{port}",
            daemon=True,
        )
        self._thread.start()
        self._stopped = False

    def stop(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.stop(grace)
        self._thread.join(timeout=grace)

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


def serve_until_signalled(
    server: EmbeddedServer, *, on_ready: Callable[[str], None] | None = None, grace: float = 10.0
) -> None:
    """Serve in the foreground until SIGTERM or SIGINT, then shut down cleanly."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        handle = ServerHandle(server)
        if on_ready is not None:
            on_ready(handle.url)
        while not stop.wait(0.5):
            if not handle._thread.is_alive():
                raise RuntimeError("server loop ended unexpectedly")
        logger.info("shutting down")
        handle.stop(grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
