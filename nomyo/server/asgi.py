"""The ASGI face of the app: what `nomyo serve` runs on granian (the `server` extra).

The HTTP server (parsing, limits, timeouts, workers) is granian's; this module only adapts.
A request's head is judged on the event loop (`SecureCompletionApp.admit`: route, API key,
rate limit, headers, size), so nothing is read for a request that will be refused. An
admitted body is then gathered as it arrives, within one total deadline, costing no thread
while it trickles; only then does a worker thread decrypt, ask the backend and seal
(`SecureCompletionApp.complete`). If the caller disconnects meanwhile, the backend call is
cancelled (its connection closed, so the backend stops generating).

Only ciphertext passes through here: the body is the sealed package, the answer too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nomyo.server.app import (
    HttpError,
    Response,
    SecureCompletionApp,
    Ticket,
    error_response,
    parse_content_length,
)
from nomyo.server.policy import is_loopback

logger = logging.getLogger("nomyo.server")

DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_THREADS = 16

# asyncio.timeout (3.11+) bounds the body read without the extra task wait_for makes on 3.11
# (about 35 us a request, measured here); 3.10 has only wait_for.
_timeout = getattr(asyncio, "timeout", None)

# Headers that must appear at most once: a second copy is a 400, never a silent choice.
_SINGLE = frozenset({
    b"authorization", b"content-length", b"content-type", b"host", b"transfer-encoding",
    b"x-payload-id", b"x-public-key", b"x-security-tier", b"x-real-ip",
})


class AsgiApp:
    """`SecureCompletionApp` as an ASGI 3 application (HTTP and lifespan scopes)."""

    def __init__(
        self,
        app: SecureCompletionApp,
        *,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        threads: int = DEFAULT_THREADS,
        client_address_header: str | None = None,
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.threads = threads
        # e.g. "x-real-ip" behind nginx: believed only from a loopback peer (the proxy)
        self.client_address_header = (client_address_header or "").lower() or None
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        # Made on first use, in the worker process (never inherited across fork).
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="nomyo-request")
        return self._pool

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                self.app.backend.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = time.perf_counter()
        method = scope["method"]
        path = scope.get("path") or "/"
        client = (scope.get("client") or ("unknown", 0))[0]
        try:
            headers, content_length = _headers(scope["headers"])
            client = self._client_address(client, headers)
        except HttpError as err:
            response = error_response(err.status, err.detail, err.headers)
            await self._send(send, method, self.app.log_answer(response, method, path, client,
                                                               started), close=True)
            return
        admitted = self.app.admit(method, path, headers, content_length, client)
        if isinstance(admitted, Response):
            # A refused body is never read: ask for the connection to close after the answer.
            unread = bool(content_length)
            await self._send(send, method, self.app.log_answer(admitted, method, path, client,
                                                               started), close=unread)
            return
        try:
            body = await self._read_body(receive, admitted)
        except HttpError as err:
            response = error_response(err.status, err.detail, err.headers)
            await self._send(send, method, self.app.log_answer(response, method, path, client,
                                                               started), close=True)
            return
        response = await self._complete(admitted, body, receive)
        await self._send(send, method, self.app.log_answer(response, method, path, client,
                                                           started))

    def _client_address(self, peer: str, headers: dict[str, str]) -> str:
        """The caller's address: the proxy's header when the peer is the local proxy."""
        if self.client_address_header is None or not is_loopback(peer):
            return peer
        value = headers.get(self.client_address_header, "").strip()
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise HttpError(400, f"missing or invalid {self.client_address_header} header"
                            ) from None

    async def _read_body(self, receive: Any, ticket: Ticket) -> bytearray:
        """The body, grown only as bytes arrive, within `body_timeout` in total."""
        gather = self._gather_body(receive, ticket.content_length)
        try:
            if _timeout is None:  # Python 3.10
                return await asyncio.wait_for(gather, self.body_timeout)
            async with _timeout(self.body_timeout):
                return await gather
        except asyncio.TimeoutError:
            raise HttpError(408, "request body not received in time") from None

    @staticmethod
    async def _gather_body(receive: Any, expected: int) -> bytearray:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "request body shorter than Content-Length")
            body += message.get("body", b"")
            if len(body) > expected:
                raise HttpError(400, "request body longer than Content-Length")
            if not message.get("more_body", False):
                break
        if len(body) != expected:
            raise HttpError(400, "request body shorter than Content-Length")
        return body

    async def _complete(self, ticket: Ticket, body: bytearray, receive: Any) -> Response:
        """`app.complete` in a worker thread; a disconnect meanwhile cancels the backend call."""
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._executor(), self.app.complete, ticket, body, cancel)
        del body

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    cancel.set()
                    return

        if not self.app.cancellable:  # nothing to cancel (echo): no watcher to pay for
            return await work
        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            return await work
        finally:
            watcher.cancel()

    async def _send(self, send: Any, method: str, response: Response, close: bool = False) -> None:
        headers = [
            (b"content-type", response.content_type.encode("latin-1")),
            (b"content-length", str(len(response.body)).encode("ascii")),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers),
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        body = b"" if method == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _headers(raw: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], int | None]:
    """Lowercase names to values; a repeated single-valued header or chunked body is refused."""
    headers: dict[str, str] = {}
    seen: set[bytes] = set()
    for name, value in raw:
        name = name.lower()
        if name in _SINGLE and name in seen:
            raise HttpError(400, f"repeated {name.decode('latin-1')} header")
        seen.add(name)
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if "transfer-encoding" in headers:
        raise HttpError(411, "chunked bodies are not supported; send Content-Length")
    try:
        return headers, parse_content_length(headers.get("content-length"))
    except ValueError:
        raise HttpError(400, "invalid Content-Length") from None
