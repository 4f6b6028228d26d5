"""`nomyo proxy`'s WSGI application: the OpenAI routes, forwarded through our sync client.

granian (the `server` extra) runs it on its WSGI interface through `nomyo.server.production`:
each request is forwarded by `create_sync` on the granian thread that serves it, with no
event loop or worker-thread hop in between. Chosen by measurement (docs/openai.md): the
same proxy on ASGI and on RSGI with the async client cost 2-3x more per request, most of it
handing the GIL between the event loop and the client's worker thread. The price: granian
has no deadline for a WSGI body, so a caller that stalls its body holds one of the
`threads` until it sends the rest or goes away (docs/openai.md says where that matters).

A request is judged by its head first (route, API key, declared size), so nothing of a
refused request's body is read. The client (and its key pair) is made in the worker process,
never in the parent, so no key crosses a fork; it is closed (its key wiped) when the worker
exits.
"""
from __future__ import annotations

import http
import logging
import multiprocessing.util
import threading
from collections.abc import Callable, Iterable
from typing import Any

from nomyo.errors import NomyoError
from nomyo.openai.gateway import Call, Gateway, Reply, error_reply

logger = logging.getLogger("nomyo.openai")

READ_CHUNK = 64 * 1024
# WSGI wants a reason phrase; an upstream status Python has no name for (499, 520, 529)
# still passes through with its own number.
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


class ProxyApp:
    """WSGI application: `gateway` judges, a client made by `make_client` forwards."""

    def __init__(self, gateway: Gateway, make_client: Callable[[], Any], *,
                 security_tier: str | None = None) -> None:
        self.gateway = gateway
        self.make_client = make_client
        self.security_tier = security_tier
        self._client: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """In the worker process, before it serves: make the client, wait for its key pair
        and close it when the process exits. A wrong key password or an unusable key
        directory stops the worker with one line (granian then gives up on a worker that
        keeps failing, and the proxy exits) instead of a 500 for every request."""
        try:
            client = self.client()
            client.wait_for_keys()
        except (NomyoError, ValueError, OSError) as err:
            logger.error("nomyo proxy: the client cannot start: %s", err)
            raise SystemExit(2) from None
        multiprocessing.util.Finalize(None, self._close, args=(client,), exitpriority=10)

    @staticmethod
    def _close(client: Any) -> None:
        client.close()
        logger.info("nomyo proxy: client closed, its key wiped")

    def client(self) -> Any:
        """The forwarding `SecureChatCompletion`, made on first use in this process."""
        with self._lock:
            if self._client is None:
                self._client = self.make_client()
            return self._client

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        reply = self._reply(environ)
        start_response(f"{reply.status} {_PHRASES.get(reply.status, 'Unknown')}", [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))), *reply.headers])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [reply.body]

    def _reply(self, environ: dict[str, Any]) -> Reply:
        headers = {key[5:].replace("_", "-").lower(): value
                   for key, value in environ.items() if key.startswith("HTTP_")}
        raw_length = environ.get("CONTENT_LENGTH") or None
        if raw_length is not None and not (raw_length.isascii() and raw_length.isdigit()):
            return error_reply(400, "invalid Content-Length")
        length = int(raw_length) if raw_length is not None else None
        finished = self.gateway.admit(environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/",
                                      headers, length)
        if finished is not None:
            return finished
        body = self._body(environ["wsgi.input"], length)
        if body is None:
            return error_reply(413, f"request body larger than {self.gateway.max_body_bytes} "
                               "bytes")
        if length is not None and len(body) != length:  # the caller went away mid-body
            body[:] = bytes(len(body))
            return error_reply(400, "request body shorter than its Content-Length")
        routed = self.gateway.parse(body)
        return routed if isinstance(routed, Reply) else self.forward(routed)

    def forward(self, call: Call) -> Reply:
        """Send `call` through the client; any failure becomes an OpenAI error reply."""
        try:
            answer = self.client().create_sync(**call.arguments(),
                                               security_tier=self.security_tier)
        except Exception as err:  # every failure reaches the caller as an OpenAI error
            return self.gateway.answer(call, None, err)
        return self.gateway.answer(call, answer, None)

    def _body(self, stream: Any, length: int | None) -> bytearray | None:
        """The body, grown as it arrives; None (what was read zeroed) past the size cap."""
        body = bytearray()
        limit = self.gateway.max_body_bytes
        while length is None or len(body) < length:
            chunk = stream.read(READ_CHUNK if length is None
                                else min(READ_CHUNK, length - len(body)))
            if not chunk:
                break
            body += chunk
            if len(body) > limit:
                body[:] = bytes(len(body))
                return None
        return body
